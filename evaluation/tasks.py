"""Task accuracy under a KV budget: real greedy generation, no teacher forcing.

Tasks (see :mod:`.task_data` for the constructions):

- ``long-prefill``: GSM8K questions spread through essay filler to 2K/4K/8K tokens (LongReason),
  budgets as fractions of the prompt (``--ratio 0.4,0.2``): prefill compression does the work.
- ``long-prefill-block``: the same, with the question's background kept together at one random point of the
  filler: a problem stated in one place of a long document (for a model that cannot collect spread facts;
  Qwen2.5-Coder-1.5B cannot use either: with the full cache it answers 1 of 9 spread questions at 1K and 2K
  tokens, 2 of 9 in a block at 2K, 4 of the 9 without filler; BENCHMARKS.md).
- ``decode-pressure``: plain GSM8K chain-of-thought with a budget (``--budget 128,256``) smaller
  than prompt + reasoning: eviction happens while the model reasons.
- ``multi-step``: ``--group`` consecutive GSM8K questions (default 6) solved one after another in one reply,
  each answer on a line ``Answer k: N``: a chain-of-thought of 1-2K tokens, where what the model read first
  must survive the longest; scored per question (``sub_correct``) and by position in the group.
- ``retrieval``: needle-in-a-haystack and variable tracking (RULER-style) at 4K/8K.

Answers: a multi-step item's question k by the number after its ``Answer k:`` (the last such line); GSM8K items
by exact numeric match of :func:`extract_answer` with the gold answer after
``####``; NIAH by the needle's number appearing in the reply; variable tracking by every variable of
the chain appearing in the reply (RULER's "all" string match, binary per item).

Every finished (item, policy, budget) is appended to a JSONL as one line and skipped on a rerun.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from infokv_local.api import InfoKVLlama, SavedConversation
from infokv_local.bench.jsonl import read_log, require_same_settings
from infokv_local.bench.speed import machine
from infokv_local.engine import policy_reading
from infokv_local.engine.sizing import DEFAULT_SIGNAL_STRIDE
from infokv_local.llamacpp.flash_attn import FlashAttn, choose_flash_attention, label, setting_of
from infokv_local.llamacpp.model import Model
from infokv_local.policies import ATTENTION_ALL_ROWS, make_policy

from . import task_data
from .forks import PromptForks
from .significance import mcnemar_exact, paired_bootstrap, wilson

TASKS = task_data.TASKS
ALL_POLICIES = ("full", "infokv", "snapkv", "h2o", "tova", "streaming", "context-shift", "random")

# ---- answer extraction ---------------------------------------------------------------------------

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*(?:\\\(|\$)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUM + r")")
_ANY_NUM = re.compile(_NUM)


def normalize_number(text: str) -> str | None:
    """A number as a canonical string: ``$1,234.50`` -> ``1234.5``, ``18.0`` -> ``18``; None if not a number."""
    t = text.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    try:
        x = float(t)
    except ValueError:
        return None
    if x != x or x in (float("inf"), float("-inf")):
        return None
    return str(int(x)) if x == int(x) else repr(x)


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a chain-of-thought reply, normalized (:func:`normalize_number`).

    In order of precedence, the *last* match of: "the answer is N" (also "The answer is \\(\\boxed{N}\\)"),
    GSM8K's "#### N", LaTeX "\\boxed{N}"; otherwise the last number in the text. None when the text
    holds no number.
    """
    for pattern in (_ANSWER_IS, _HASHES, _BOXED, _ANY_NUM):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    return None


_ANSWER_K = re.compile(r"Answer\s*(\d+)\s*[:=]\s*(?:\\\(|\$)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")", re.IGNORECASE)


def extract_numbered_answers(text: str, k: int) -> list[str | None]:
    """The answers of a multi-step reply to questions 1..``k``: the number after the last ``Answer i:`` line of
    each, normalized (None where there is none)."""
    out: list[str | None] = [None] * k
    for m in _ANSWER_K.finditer(text):
        i = int(m.group(1))
        if 1 <= i <= k:
            out[i - 1] = normalize_number(m.group(2))
    return out


def numeric_match(pred: str | None, gold: str) -> bool:
    """Exact numeric equality of a predicted and a gold answer (both normalized)."""
    g = normalize_number(gold)
    return pred is not None and g is not None and pred == g


def retrieval_correct(text: str, answers: list[str]) -> bool:
    """Every expected string appears in the reply (as a whole word)."""
    return all(re.search(r"(?<![\w])" + re.escape(a) + r"(?![\w])", text) for a in answers)


# ---- items -------------------------------------------------------------------------------------

@dataclass
class TaskItem:
    item_id: str
    task: str
    length: int | None  # target context length in tokens (long-prefill, retrieval)
    prompt: str         # the user message
    gold: list[str]     # gold answer (GSM8K) or the strings that must all appear (retrieval)
    max_tokens: int
    kind: str           # "gsm8k", "gsm8k-multi" (several questions: gold holds each answer), "niah",
    #                     "variable_tracking"


RETRIEVAL_KINDS = ("niah", "variable_tracking")


def build_items(task: str, model: Model, questions: list[dict], lengths: Iterable[int], seed: int,
                max_tokens: int | None = None, kinds: Iterable[str] = RETRIEVAL_KINDS,
                group: int = 6) -> list[TaskItem]:
    """The items of ``task`` (GSM8K questions; for multi-step, ``group`` consecutive ones per item; for retrieval,
    one item of each of ``kinds`` per question id and length, the id choosing the construction's seed)."""
    def count(text: str) -> int:
        return len(model.tokenize(text, add_special=False, parse_special=False))

    items: list[TaskItem] = []
    if task == "decode-pressure":
        for q in questions:
            items.append(TaskItem(f"gsm8k-{q['id']}", task, None, task_data.cot_prompt(q["question"]), [q["answer"]],
                                  max_tokens or 400, "gsm8k"))
    elif task == "multi-step":
        for g in task_data.group_questions(questions, group):
            items.append(TaskItem(f"gsm8k-{g['id']}", task, None, g["question"], g["answers"],
                                  max_tokens or 400 * group, "gsm8k-multi"))
    elif task in ("long-prefill", "long-prefill-block"):
        layout = "block" if task == "long-prefill-block" else "spread"
        for n in lengths:
            for q in questions:
                lp = task_data.long_prefill_context(q["question"], n, count, seed=seed + int(_digits(q["id"])),
                                                    layout=layout)
                suffix = "" if layout == "spread" else f"-{layout}"
                items.append(TaskItem(f"gsm8k-{q['id']}@{n}{suffix}", task, n, task_data.long_prefill_prompt(lp),
                                      [q["answer"]], max_tokens or 400, "gsm8k"))
    elif task == "retrieval":
        kinds = list(kinds)
        unknown = [k for k in kinds if k not in RETRIEVAL_KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown retrieval kind {unknown[0] if unknown else ''!r}; choose from "
                             f"{', '.join(RETRIEVAL_KINDS)}")
        makers = {"niah": task_data.niah_item, "variable_tracking": task_data.variable_tracking_item}
        for n in lengths:
            for q in questions:
                i = int(q["id"])
                s = seed * 1000 + i
                for kind in kinds:
                    d = makers[kind](n, count, s)
                    items.append(TaskItem(f"{kind}-{i}@{n}", task, n, d["prompt"], d["answers"],
                                          max_tokens or 48, kind))
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return items


def _digits(s: str) -> str:
    d = "".join(c for c in s if c.isdigit())
    return d[-6:] or "0"


def score_item(item: TaskItem, text: str) -> tuple[bool, str | None]:
    """(correct, the extracted prediction) of a reply."""
    if item.kind == "gsm8k":
        pred = extract_answer(text)
        return numeric_match(pred, item.gold[0]), pred
    if item.kind == "gsm8k-multi":
        preds = extract_numbered_answers(text, len(item.gold))
        return all(sub_correct(item, text)), ",".join("" if p is None else p for p in preds)
    return retrieval_correct(text, item.gold), None


def sub_correct(item: TaskItem, text: str) -> list[bool]:
    """Whether each question of a multi-step item is answered right, in order."""
    preds = extract_numbered_answers(text, len(item.gold))
    return [numeric_match(p, g) for p, g in zip(preds, item.gold, strict=True)]


# ---- running -----------------------------------------------------------------------------------

def budget_tokens(spec: str, prompt_tokens: int) -> int:
    """A budget spec as tokens: ``"256"`` (tokens) or ``"r0.25"`` (fraction of the prompt)."""
    return max(int(float(spec[1:]) * prompt_tokens), 1) if spec.startswith("r") else int(spec)


# the settings a record of an evicting policy was made with, where it does not say (made before it did);
# "together": a fidelity-decode replay decoded as a sequence of a shared context (one by one before)
RECORD_DEFAULTS: dict[str, Any] = {"prompt_probe": False, "buffer": 64, "n_sink": 4, "n_recent": 32, "together": False}


def read_done(path: Path, settings: dict[str, Any] | None = None) -> dict[tuple[str, str, str], dict]:
    """Finished records of a JSONL, keyed by (item, policy, budget spec); a torn last line is dropped.
    ``settings``: this run's cache settings (keys of :data:`RECORD_DEFAULTS`; None: only the prompt probe,
    off); ``ValueError`` when a record of an evicting policy was made with others, so a rerun never mixes
    them into one log (the full cache is the same under every one)."""
    want = {"prompt_probe": False} if settings is None else settings
    done = {}
    for r in read_log(path):
        if r["policy"] != "full":
            require_same_settings(path, {**RECORD_DEFAULTS, **r}, want, f"{r['policy']} was ")
        done[(r["item_id"], r["policy"], r["budget_spec"])] = r
    return done


def run_flash_attn(model: Model, policies: list[str], largest_budget: int, buffer: int, n_threads: int | None,
                   asked: FlashAttn, done: dict[tuple[str, str, str], dict], log: Path) -> FlashAttn:
    """The one flash-attention setting of every generation of a run, full cache included, so that the
    policies differ only in what they keep: as a log already says (records since the setting was recorded),
    else as asked, else off when a policy needs every query row's attention (H2O), else the engine's verdict
    for the largest evicting budget's size class. ``ValueError`` when asked for one the log or a policy rules
    out; None on a GPU (llama.cpp's choice, the same for every engine)."""
    said = {r["flash_attn"] for r in done.values() if r.get("flash_attn") is not None}
    if len(said) > 1:
        raise ValueError(f"{log}: generations with flash attention {sorted(said)}; give another output path")
    all_rows = [p for p in policies if ATTENTION_ALL_ROWS in make_policy(p).needs]
    if said:
        was = said.pop()
        setting = setting_of(was)
        if asked is not None and asked != setting:
            raise ValueError(f"{log}: generated with flash attention {was}, asked for {label(asked)} now; give "
                             f"another output path or the same setting")
        if setting and all_rows:
            raise ValueError(f"{log}: generated with flash attention {was}, which policy {all_rows[0]!r} cannot use "
                             f"(it needs the attention of every query row); give another output path")
        return setting
    if all_rows and asked:
        raise ValueError(f"policy {all_rows[0]!r} needs flash attention off (the attention of every query row), "
                         f"and every policy of a run uses one setting: leave it out of this run or ask for off")
    if asked is not None:
        return asked
    if all_rows:
        return False
    setting, _ = choose_flash_attention(model, False, None, "f16", n_threads, capacity=largest_budget + buffer,
                                        stride=DEFAULT_SIGNAL_STRIDE)
    return setting


def run_tasks(model: Model, task: str, items: list[TaskItem], policies: list[str], budget_specs: list[str],
              out_jsonl: str | Path, buffer: int = 64, n_sink: int = 4, n_recent: int = 32,
              n_threads: int | None = None, progress: bool = True, prompt_probe: bool = False,
              parallel: int = 1, flash_attn: FlashAttn = None, fork: bool = True) -> list[dict]:
    """Generate greedily for every (item, policy, budget) not yet in ``out_jsonl``; returns all records.

    ``full`` runs once per item (budget spec ``"full"``). A budget that cannot hold the protected
    tokens, or is at least the whole prompt + max_tokens (nothing would be evicted), is recorded
    as skipped and not counted. ``prompt_probe``: the engine's (compressions of the prompt read its end
    ahead). Records say the cache settings; a log made with other ones (probe, buffer, sinks, recent) is refused.
    ``parallel`` > 1: the evicting (item, policy, budget) generations run that many at a time as sequences of one
    context (:meth:`~infokv_local.InfoKVLlama.run_together`), their tokens decoded together; the full cache's
    one after another beside them. Records are written as each generation ends (not in item order).
    ``fork``: an item's prompt is read once for the policies that read it alike
    (:func:`~infokv_local.engine.policy_reading`) and forked to the others (:meth:`InfoKVLlama.fork_state`) while
    no compression has touched it (:mod:`.forks`); records say ``prompt_forked``. The fork leaves exactly the cells
    and signals the policy's own reading would have, so forked and read generations are alike.
    ``flash_attn``: every generation of the run uses one setting, recorded (:func:`run_flash_attn`).
    """
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = {"prompt_probe": prompt_probe, "buffer": buffer, "n_sink": n_sink, "n_recent": n_recent}
    done = read_done(out, cache)
    model_name = Path(str(model.path)).name
    n_ctx = max((len(model.tokenize(it.prompt)) + it.max_tokens + 64 for it in items), default=512)
    largest = max((budget_tokens(spec, n_ctx) for spec in budget_specs), default=n_ctx)
    setting = run_flash_attn(model, policies, largest, buffer, n_threads, flash_attn, done, out)
    kw: dict[str, Any] = dict(buffer=buffer, n_sink=n_sink, n_recent=n_recent, n_threads=n_threads,
                              prompt_probe=prompt_probe, flash_attn=setting)
    llm = InfoKVLlama(model, policy="full", n_ctx=n_ctx, **kw)
    guard = threading.Lock()
    cpu = machine()["cpu"]  # greedy texts can differ by CPU (llama.cpp's kernels round differently)
    try:
        fmt = llm._chat_formatter()  # the GGUF's chat template, to count prompt tokens for ratio budgets
        jobs: list[tuple[TaskItem, str, str, dict[str, Any]]] = []
        for it in items:
            messages = [{"role": "user", "content": it.prompt}]
            formatted = fmt(messages=cast(Any, messages))
            n_prompt = len(model.tokenize(formatted.prompt, add_special=not formatted.added_special))
            for p in policies:
                for spec in (["full"] if p == "full" else budget_specs):
                    if (it.item_id, p, spec) in done:
                        continue
                    budget = None if spec == "full" else budget_tokens(spec, n_prompt)
                    rec: dict[str, Any] = {"task": task, "model": model_name, "item_id": it.item_id, "kind": it.kind,
                                           "length": it.length, "policy": p, "budget_spec": spec,
                                           "prompt_tokens": n_prompt, "gold": it.gold, **cache, "budget": budget,
                                           "flash_attn": None if setting is None else label(setting), "cpu": cpu}
                    if budget is not None and (budget < n_sink + n_recent + 1 or budget >= n_prompt + it.max_tokens):
                        rec.update(skipped=True, correct=None)
                    jobs.append((it, p, spec, rec))
        with out.open("a") as fh:
            bar = tqdm(total=len(jobs), desc=f"{task}", unit="gen", disable=not progress)

            def finish(rec: dict[str, Any]) -> None:
                with guard:
                    fh.write(json.dumps(rec) + "\n")
                    fh.flush()
                    done[(rec["item_id"], rec["policy"], rec["budget_spec"])] = rec
                    bar.set_postfix_str(f"{rec['policy']} {rec['budget_spec']}")
                    bar.update()

            forks = PromptForks() if fork else None

            def generate(one: InfoKVLlama, it: TaskItem, rec: dict[str, Any]) -> None:
                budget = rec["budget"]
                one.configure(policy=rec["policy"], budget=budget if budget is not None else 1024)
                t0 = time.perf_counter()
                messages = [{"role": "user", "content": it.prompt}]
                if forks is not None and rec["policy"] != "full":
                    key = (it.item_id, rec["budget_spec"], policy_reading(one.engine.policy))
                    rec["prompt_forked"] = forks.read_or_fork(key, lambda: _read_prompt(one, messages),
                                                              one.fork_state)
                res = one.create_chat_completion(messages, temperature=0.0, max_tokens=it.max_tokens, seed=0)
                text = res["choices"][0]["message"]["content"]
                correct, pred = score_item(it, text)
                kv = res["usage"]["kv"]
                if rec["flash_attn"] is not None and kv["flash_attn"] != rec["flash_attn"]:
                    raise RuntimeError(f"{rec['policy']} ran with flash attention {kv['flash_attn']}, the run's "
                                       f"setting is {rec['flash_attn']}")
                if it.kind == "gsm8k-multi":
                    rec["sub_correct"] = sub_correct(it, text)
                rec.update(skipped=False, correct=bool(correct), pred=pred, text=text,
                           completion_tokens=res["usage"]["completion_tokens"],
                           finish_reason=res["choices"][0]["finish_reason"],
                           evicted_tokens=kv["evicted_tokens"], max_used_cells=kv["max_used_cells"],
                           seconds=round(time.perf_counter() - t0, 2))
                finish(rec)

            for job in jobs:
                if job[3].get("skipped"):
                    finish(job[3])
            runs = [j for j in jobs if not j[3].get("skipped")]
            if forks is not None:
                forks.expect([(j[0].item_id, j[2], policy_reading(make_policy(j[1]))) for j in runs if j[1] != "full"])
            together = [j for j in runs if j[1] != "full"] if parallel > 1 else []
            for it, p, _, rec in runs:
                if p == "full" or not together:
                    generate(llm, it, rec)
            if together:
                _run_together(model, together, generate, parallel, kw)
            bar.close()
    finally:
        llm.close()
    keep = {it.item_id for it in items}
    return [r for r in done.values() if r["item_id"] in keep and r["policy"] in policies
            and (r["budget_spec"] in budget_specs or r["budget_spec"] == "full")]


def _read_prompt(one: InfoKVLlama, messages: list[dict[str, Any]]) -> SavedConversation | None:
    """Read a chat's prompt; the state to fork to others, unless a compression touched it."""
    one.prefill(messages)
    return None if one.engine.totals.evicted_tokens else one.export_state()


def _run_together(model: Model, jobs: list[tuple[TaskItem, str, str, dict[str, Any]]], generate: Any,
                  parallel: int, kw: dict[str, Any]) -> None:
    """The evicting generations, ``parallel`` at a time in one context sized for the largest budget. A Ctrl-C
    lets the generations in progress end (their records are written) before it is raised; the first error of a
    generation is raised once the others have ended (a rerun resumes the rest)."""
    largest = max(j[3]["budget"] for j in jobs)
    policies = sorted({j[1] for j in jobs})
    stop = threading.Event()
    errors: list[BaseException] = []

    def work(_: int, one: InfoKVLlama, job: tuple[TaskItem, str, str, dict[str, Any]]) -> None:
        try:
            generate(one, job[0], job[3])
        except BaseException as e:  # noqa: BLE001 - raised below, after the others
            errors.append(e)
            stop.set()

    with InfoKVLlama(model, policy=policies[0], budget=largest, **kw) as template:
        template.run_together(jobs, work, min(parallel, len(jobs)), policies=policies,
                              capacity=largest + kw["buffer"], stop=stop)
    if errors:
        raise errors[0]


# ---- summaries ---------------------------------------------------------------------------------

def select_records(records: list[dict], budgets: Sequence[str] | None = None, common: bool = False,
                   policies: Sequence[str] | None = None) -> list[dict]:
    """The records of a log a summary is asked for.

    ``budgets``: only these budget specs (as the log writes them, e.g. ``"128"`` or ``"r0.25"``), and the full
    cache's records, which are every budget's reference. ``policies``: only these policies (as the log writes
    them), and the full cache's records. ``common``: only the items that every (policy, budget) left has a
    record of, so that every row is measured on the same questions (a log that holds some policies on more
    items than others otherwise reports each on its own items); applied after the other two, so a policy run
    on fewer questions can be left out of the rows instead of narrowing them all."""
    wanted = set(budgets) if budgets else None
    chosen = set(policies) if policies else None
    kept = [r for r in records if r.get("policy") == "full" or (
        (wanted is None or r.get("budget_spec") in wanted) and (chosen is None or r.get("policy") in chosen))]
    if not common or not kept:
        return kept
    items: dict[tuple[str, str], set[str]] = defaultdict(set)
    for r in kept:
        items[(r["policy"], str(r.get("budget_spec")))].add(r["item_id"])
    shared = set.intersection(*items.values())
    return [r for r in kept if r["item_id"] in shared]


def _outcomes(records: list[dict]) -> dict[tuple, dict[str, bool]]:
    """Answered items per (task, model, length, policy, budget spec): item id -> correct."""
    groups: dict[tuple, dict[str, bool]] = defaultdict(dict)
    for r in records:
        if r.get("skipped") or r.get("correct") is None:
            continue
        groups[(r["task"], r["model"], r["length"], r["policy"], r["budget_spec"])][r["item_id"]] = bool(r["correct"])
    return groups


def paired_outcomes(a: dict[str, bool], b: dict[str, bool], n_boot: int = 10000, seed: int = 0) -> dict[str, Any]:
    """a against b on the items both answered: their number, the mean difference with its bootstrap
    interval, wins / losses and the exact McNemar p."""
    common = sorted(set(a) & set(b))
    xa, xb = [a[i] for i in common], [b[i] for i in common]
    diff, lo, hi = paired_bootstrap(xa, xb, n_boot=n_boot, seed=seed)
    n10, n01, p = mcnemar_exact(xa, xb)
    return {"n": len(common), "diff": diff, "ci95": [lo, hi], "wins": n10, "losses": n01, "mcnemar_p": p}


def _references(reference: str | Sequence[str]) -> tuple[str, ...]:
    return (reference,) if isinstance(reference, str) else tuple(reference)


def summarize(records: list[dict], reference: str | Sequence[str] = "infokv", n_boot: int = 10000,
              seed: int = 0) -> list[dict]:
    """Accuracy per (task, model, length, policy, budget spec) with a Wilson 95% interval, and the
    paired difference of each ``reference`` policy against every other policy on the same items (bootstrap
    interval, exact McNemar p-value). The full cache is compared at every budget."""
    references = _references(reference)
    groups = _outcomes(records)
    results = []
    def order(key: tuple) -> tuple:
        task, model, length, policy, spec = key
        return (task, model, length or 0, policy != "full", spec, policy not in references,
                references.index(policy) if policy in references else 0, policy)

    for (task, model, length, policy, spec), outcomes in sorted(groups.items(), key=lambda kv: order(kv[0])):
        n, k = len(outcomes), sum(outcomes.values())
        lo, hi = wilson(k, n)
        row: dict[str, Any] = {"task": task, "model": model, "length": length, "policy": policy, "budget": spec,
                               "n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi]}
        if policy in references:
            row["paired"] = {}
            for (t2, m2, l2, p2, s2), other in groups.items():
                if (t2, m2, l2) != (task, model, length) or p2 == policy or (s2 != spec and p2 != "full"):
                    continue
                row["paired"][p2] = paired_outcomes(outcomes, other, n_boot, seed)
        results.append(row)
    return results


def summarize_questions(records: list[dict], reference: str | Sequence[str] = "infokv", n_boot: int = 10000,
                        seed: int = 0) -> list[dict]:
    """Multi-step items counted by question: per (model, policy, budget spec) the questions answered right (Wilson
    95% interval, which takes them as independent) and the accuracy at each position in the group; and
    each ``reference`` policy minus every other policy in the share of a group's questions answered right,
    paired by group with a bootstrap over groups (the questions of a group are not independent), and the
    groups it answered more / fewer of."""
    fractions: dict[tuple, dict[str, float]] = defaultdict(dict)
    by_position: dict[tuple, list[list[bool]]] = defaultdict(list)
    for r in records:
        if r.get("skipped") or r.get("sub_correct") is None:
            continue
        key = (r["model"], r["policy"], r["budget_spec"])
        sub = [bool(x) for x in r["sub_correct"]]
        fractions[key][r["item_id"]] = sum(sub) / len(sub)
        by_position[key].append(sub)
    references = _references(reference)
    rows = []
    for key in sorted(fractions, key=lambda k: (k[0], k[1] != "full", k[2], k[1] not in references, k[1])):
        model, policy, spec = key
        subs = by_position[key]
        n_q, k = sum(len(x) for x in subs), sum(sum(x) for x in subs)
        width = max(len(x) for x in subs)
        at = [[x[i] for x in subs if len(x) > i] for i in range(width)]
        row: dict[str, Any] = {"model": model, "policy": policy, "budget": spec, "groups": len(subs), "questions": n_q,
                               "correct": k, "accuracy": k / n_q, "ci95": list(wilson(k, n_q)),
                               "by_position": [sum(a) / len(a) for a in at]}
        if policy in references:
            row["paired"] = {}
            for (m2, p2, s2), other in fractions.items():
                if m2 != model or p2 == policy or (s2 != spec and p2 != "full"):
                    continue
                common = sorted(set(fractions[key]) & set(other))
                xa, xb = [fractions[key][i] for i in common], [other[i] for i in common]
                diff, lo, hi = paired_bootstrap(xa, xb, n_boot=n_boot, seed=seed)
                row["paired"][p2] = {"groups": len(common), "diff": diff, "ci95": [lo, hi],
                                     "more": sum(a > b for a, b in zip(xa, xb, strict=True)),
                                     "fewer": sum(a < b for a, b in zip(xa, xb, strict=True))}
        rows.append(row)
    return rows


def format_question_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`summarize_questions`."""
    lines = [f"{'budget':>7s} {'policy':14s}{'groups':>7s}{'questions':>10s}{'acc':>7s}  {'95% CI':14s} by position"]
    for r in rows:
        lo, hi = r["ci95"]
        pos = " ".join(f"{a:.2f}" for a in r["by_position"])
        lines.append(f"{r['budget']:>7s} {r['policy']:14s}{r['groups']:>7d}{r['questions']:>10d}{r['accuracy']:>7.1%}"
                     f"  [{lo:.2f}, {hi:.2f}]  {pos}")
    for r in (r for r in rows if r.get("paired")):
        lines.append("")
        lines.append(f"{r['policy']} minus each other policy, share of a group's questions right (bootstrap 95% CI "
                     f"over groups; groups with more/fewer)")
        for p2, d in sorted(r["paired"].items()):
            lines.append(f"{r['budget']:>7s} vs {p2:14s}{d['groups']:>4d} {d['diff']:+7.1%} "
                         f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] {d['more']}/{d['fewer']}")
    return "\n".join(lines)


def compare_logs(a: list[dict], b: list[dict], n_boot: int = 10000, seed: int = 0) -> list[dict]:
    """Two runs of the same items under two settings (e.g. the prompt probe on and off), paired per
    (task, model, length, policy, budget spec) on the items both answered: each run's accuracy with a
    Wilson 95% interval, a minus b with a bootstrap interval, wins / losses and the exact McNemar p."""
    ga, gb = _outcomes(a), _outcomes(b)
    rows = []
    for key in sorted(set(ga) & set(gb), key=lambda k: (k[0], k[1], k[2] or 0, k[3] != "full", k[4], k[3])):
        common = set(ga[key]) & set(gb[key])
        if not common:
            continue
        correct_a = sum(ga[key][i] for i in common)
        correct_b = sum(gb[key][i] for i in common)
        paired = paired_outcomes(ga[key], gb[key], n_boot, seed)
        task, model, length, policy, spec = key
        rows.append({"task": task, "model": model, "length": length, "policy": policy, "budget": spec,
                     "n": len(common), "correct_a": correct_a, "correct_b": correct_b,
                     "ci95_a": list(wilson(correct_a, len(common))), "ci95_b": list(wilson(correct_b, len(common))),
                     **{k: v for k, v in paired.items() if k != "n"}})
    return rows


def format_table(results: list[dict]) -> str:
    """A plain-text table: accuracy [Wilson 95%] per policy and budget; paired differences below."""
    lines = [f"{'task':19s}{'len':>6s} {'budget':>7s} {'policy':14s}{'n':>4s}{'acc':>7s}  {'95% CI':15s}"]
    for r in results:
        lo, hi = r["ci95"]
        lines.append(f"{r['task']:19s}{r['length'] or '':>6} {r['budget']:>7s} {r['policy']:14s}{r['n']:>4d}"
                     f"{r['accuracy']:>7.1%}  [{lo:.2f}, {hi:.2f}]")
    for r in (r for r in results if r.get("paired")):
        lines.append("")
        lines.append(f"{r['policy']} minus each other policy on the same items (bootstrap 95% CI; wins/losses; "
                     f"McNemar p)")
        for p2, d in sorted(r["paired"].items()):
            lines.append(f"{r['task']:19s}{r['length'] or '':>6} {r['budget']:>7s} vs {p2:14s}{d['n']:>4d} "
                         f"{d['diff']:+7.1%} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] "
                         f"{d['wins']}/{d['losses']}  p={d['mcnemar_p']:.3f}")
    return "\n".join(lines)

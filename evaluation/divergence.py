"""Where a policy's greedy reply first leaves the full cache's, and whether it left by changing a number.

Greedy decoding under a budget writes the full cache's text token for token until an eviction changes an
argmax; the first character where two replies of the same prompt differ is where the eviction showed. For
the answers a policy loses against the full cache (and those it wins), this reads what changed there: a number
written differently (the reference writes "80", the policy "8"), and whether that number had been written
before in the question or the reply, i.e. was being copied from text the cache may have evicted; and, over the
whole reply, which of the question's numbers the reference's reply uses and the policy's never writes (a fact of
the question lost on the way). It is read off a ``python -m evaluation tasks`` log after the run; nothing is
re-generated.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")

NUMBER_COPIED = "number copied, written differently"
NUMBER_NEW = "number written differently"
OTHER = "other text"
SAME = "same text"
QUESTION_NUMBER_DROPPED = "a question's number never written"


def first_difference(a: str, b: str) -> int | None:
    """Index of the first character where ``a`` and ``b`` differ (the shorter one's length if one is a prefix of
    the other); None when they are equal."""
    return None if a == b else len(os.path.commonprefix([a, b]))


def number_at(text: str, i: int) -> tuple[int, str] | None:
    """The written number (digits, with "." or "," between digits) that covers index ``i`` of ``text`` or ends
    right before it, as (start, number); None when there is none. A number the two texts share the start of
    ("8" in "80" and "8 ") is found from either text at the index where they part."""
    for m in _NUMBER.finditer(text):
        if m.start() <= i <= m.end():
            return m.start(), m.group()
        if m.start() > i:
            break
    return None


def classify(reference: str, other: str, context: str = "") -> dict[str, Any]:
    """What changed where ``other`` first leaves ``reference``: a number written differently (copied when the
    reference's number appears in ``context`` or earlier in the reference), or other text."""
    at = first_difference(reference, other)
    if at is None:
        return {"at": None, "kind": SAME, "reference": "", "other": ""}
    ref_num, other_num = number_at(reference, at), number_at(other, at)
    out: dict[str, Any] = {"at": at, "reference": _snippet(reference, at), "other": _snippet(other, at)}
    ref_number = ref_num[1] if ref_num else None
    other_number = other_num[1] if other_num else None
    if ref_number == other_number:  # both None, or the same number followed by different text
        out["kind"] = OTHER
    else:
        out.update(reference_number=ref_number, other_number=other_number, kind=NUMBER_NEW)
        if ref_num is not None:
            earlier = {m.group() for m in _NUMBER.finditer(context + "\n" + reference[:ref_num[0]])}
            if ref_number in earlier:
                out["kind"] = NUMBER_COPIED
    return out


def _numbers(text: str) -> set[str]:
    return {m.group().replace(",", "") for m in _NUMBER.finditer(text)}


def question_numbers_dropped(question: str, reference: str, other: str) -> list[str]:
    """The numbers of ``question`` that ``reference`` writes and ``other`` never does ("1,200" and "1200" alike)."""
    q = _numbers(question)
    return sorted((q & _numbers(reference)) - _numbers(other), key=lambda n: (len(n), n))


def _snippet(text: str, at: int, before: int = 40, after: int = 30) -> str:
    return (("…" if at > before else "") + text[max(0, at - before):at] + "⟨" + text[at:at + after]
            + ("…" if at + after < len(text) else "")).replace("\n", " ")


def divergences(records: Iterable[dict], policy: str, against: str = "full", budget: str | None = None,
                questions: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """For each item where ``policy`` (at ``budget``, any when None) and ``against`` disagree on correctness:
    "lost" (``against`` right) or "won", and :func:`classify` of the policy's reply against the other's."""
    ref: dict[str, dict] = {}
    mine: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.get("skipped") or r.get("correct") is None or "text" not in r:
            continue
        if r["policy"] == against and (against == "full" or budget is None or r["budget_spec"] == budget):
            ref[r["item_id"]] = r
        if r["policy"] == policy and (budget is None or r["budget_spec"] == budget):
            mine[(r["item_id"], r["budget_spec"])] = r
    rows = []
    for (item, spec), r in sorted(mine.items()):
        a = ref.get(item)
        if a is None or bool(a["correct"]) == bool(r["correct"]):
            continue
        question = (questions or {}).get(item, "")
        row = {"item_id": item, "budget": spec, "outcome": "lost" if a["correct"] else "won",
               "gold": r.get("gold"), "pred": r.get("pred"), "reference_pred": a.get("pred"),
               **classify(a["text"], r["text"], question),
               "question_numbers_dropped": question_numbers_dropped(question, a["text"], r["text"])}
        rows.append(row)
    return rows


def counts(rows: list[dict]) -> dict[str, dict[str, int]]:
    """Per outcome ("lost", "won"), how many of each kind, and in how many replies a question's number the
    reference used was never written (``QUESTION_NUMBER_DROPPED``)."""
    out: dict[str, Counter] = {"lost": Counter(), "won": Counter()}
    for r in rows:
        out[r["outcome"]][r["kind"]] += 1
        if r.get("question_numbers_dropped"):
            out[r["outcome"]][QUESTION_NUMBER_DROPPED] += 1
    return {k: dict(v) for k, v in out.items()}


def markdown(rows: list[dict]) -> str:
    lines = ["| item | budget | outcome | kind | reference ⟨ where the policy leaves it | the policy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        ref, other = (r[k].replace("|", "\\|") for k in ("reference", "other"))
        lines.append(f"| {r['item_id']} | {r['budget']} | {r['outcome']} | {r['kind']} | {ref} | {other} |")
    return "\n".join(lines)

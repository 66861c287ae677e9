"""JSONL files of the benchmarks: inputs read strictly (a bad line is an error naming it), and resumable
logs read leniently (a line torn by a kill is dropped, and the file rewritten without it so that the
next appended record starts on a line of its own)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def read_inputs(path: str | Path, valid: Callable[[Any], bool], expected: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line; ``ValueError`` naming the line when one is not JSON
    or not ``valid`` (``expected`` says what a line should be)."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(d, dict) or not valid(d):
            raise ValueError(f"{path}:{i}: expected {expected}")
        out.append((i, d))
    return out


def read_log(path: str | Path) -> list[dict]:
    """The records of a resumable log (none when it does not exist yet)."""
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text()
    records, good = [], []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
            good.append(line)
    clean = "".join(g + "\n" for g in good)
    if clean != text:
        p.write_text(clean)
    return records


def require_same_settings(log: str | Path, record: dict, config: dict, what: str = "") -> None:
    """``ValueError`` naming every setting of ``config`` that ``record``, read from ``log``, has otherwise: a rerun
    must not mix measurements made with other settings. ``what`` says what was measured ("budget r0.25 was ")."""
    diff = {k: (record.get(k), v) for k, v in config.items() if record.get(k) != v}
    if diff:
        said = ", ".join(f"{k} {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise ValueError(f"{log}: {what}measured with other settings ({said}); give another output path or the "
                         "same settings")

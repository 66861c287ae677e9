"""``InfoKVLlama``: the object and its lifetime (loading, closing, reset, configure, tokens).

The completion and chat methods take llama-cpp-python's arguments and return the same
OpenAI-style dicts as ``llama_cpp.Llama`` (choices, finish_reason, usage; chunk dicts with
``stream=True``; typed in :mod:`.types`). What is new: the budget and the eviction policy, and a ``kv``
block (in ``usage`` and in every chunk) telling what the cache holds. Successive calls reuse the
compressed cache for the part of the prompt it already holds (a chat's history), instead of prefilling
it again.

The object holds the state; the work is done by the functions of :mod:`.completion`, :mod:`.chat` and
:mod:`.kv`, which take it as their first argument.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from ..engine import Engine, EngineSnapshot, FairRLock, SharedContext, run_workers
from ..engine.interrupts import sigint_deferred
from ..errors import BudgetError, ForkRefused
from ..llamacpp.model import Model
from ..policies import Policy, make_policy
from ..settings import DEFAULTS, Settings
from . import chat, completion, kv
from .chat import ChatCompletionResult
from .completion import CompletionResult
from .kv import CacheMap
from .prompt import PromptCache, prompt_of
from .text_stream import token_bytes
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, KVStats

T = TypeVar("T")

_model_locks: weakref.WeakKeyDictionary[Model, FairRLock] = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _parallel(parallel: object) -> int:
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise BudgetError(f"parallel must be a positive whole number of sequences (got {parallel!r})")
    return parallel


def model_lock(model: Model) -> FairRLock:
    """The lock that queues generation on one loaded model (shared by every InfoKVLlama on it, and by the
    shared contexts made for them): first come, first served, reentrant."""
    with _locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = FairRLock()
        return lock


class InfoKVLlama:
    """A GGUF model generating under a fixed KV-cache budget, used like ``llama_cpp.Llama``.

    ``model_path`` is a GGUF file or an already loaded :class:`~infokv_local.llamacpp.model.Model` (shared,
    e.g. between chat sessions; it is then not closed here). ``budget`` (tokens) or ``budget_mib``
    (MiB of KV memory) is what the cache is compressed to, ``buffer`` how far it grows between
    compressions; the ``n_sink`` first and ``n_recent`` last tokens are never evicted (``n_ctx``
    sizes the context of the non-evicting ``full`` policy; default the model's trained context). ``policy`` is
    a name (``infokv``, ``h2o``, ``snapkv``, ``tova``, ``streaming``, ``full``...; parameters as
    ``"infokv:alpha=0.9"``) or a :class:`~infokv_local.policies.Policy`. ``flash_attn`` (None: chosen
    per backend; ``"split"``: on for prompts, off for one-token steps), ``cache_type_k`` / ``cache_type_v``
    (``f16``, ``q8_0``, ``q4_0``...) are the engine's (:class:`~infokv_local.engine.Engine`), as is
    ``prompt_probe`` (compressions while a long prompt is read keep what the prompt's end, usually the question,
    attends to). The defaults are :data:`infokv_local.settings.DEFAULTS`, shared with the command line and the
    chat UI.

    ``shared`` (a :class:`~infokv_local.engine.SharedContext` made by :meth:`shared_context`) puts
    this object's conversation in one sequence of a context several objects share: their generation
    steps are decoded together when they generate at the same time on threads of their own (see
    :meth:`create_completions`).
    """

    model: Model
    model_path: str
    seed: int
    parallel: int
    _calls: int  # requests made: the default seed of the next one
    _lock: FairRLock  # the model's lock: one llama.cpp call at a time on the model
    _engine: Engine | None
    _engine_args: dict[str, Any]
    _shared: SharedContext | None
    _owns_model: bool
    _prompt: PromptCache  # the sequence's text, piece by piece, for prefix reuse
    _formatter: Jinja2ChatFormatter | None  # the chat template, made on the first chat
    _active: bool  # a request's chunks are being read

    def __init__(
        self,
        model_path: str | os.PathLike[str] | Model,
        *,
        policy: str | Policy = DEFAULTS.policy,
        budget: int | None = DEFAULTS.budget,
        budget_mib: float | None = DEFAULTS.budget_mib,
        buffer: int = DEFAULTS.buffer,
        n_sink: int = DEFAULTS.n_sink,
        n_recent: int = DEFAULTS.n_recent,
        window: int = DEFAULTS.window,
        n_batch: int = DEFAULTS.n_batch,
        n_threads: int | None = DEFAULTS.n_threads,
        n_gpu_layers: int = DEFAULTS.n_gpu_layers,
        seed: int = DEFAULTS.seed,
        n_ctx: int | None = DEFAULTS.n_ctx,
        flash_attn: bool | str | None = DEFAULTS.flash_attn,
        cache_type_k: str = DEFAULTS.cache_type_k,
        cache_type_v: str = DEFAULTS.cache_type_v,
        prompt_probe: bool = DEFAULTS.prompt_probe,
        max_checkpoints: int = DEFAULTS.max_checkpoints,
        rpc: tuple[str, ...] | list[str] | str = DEFAULTS.rpc,
        check_invariants: bool = False,
        parallel: int = DEFAULTS.parallel,
        shared: SharedContext | None = None,
    ) -> None:
        self._engine = None
        self._owns_model = False
        if isinstance(model_path, Model):
            self.model = model_path
        else:
            self.model, self._owns_model = Model(os.fspath(model_path), n_gpu_layers=n_gpu_layers,
                                                        rpc=rpc), True
        self.model_path = str(self.model.path)
        self.seed = seed
        self._calls = 0
        self._lock = model_lock(self.model)
        if shared is not None and (shared.model is not self.model or shared.lock is not self._lock):
            self._free()
            raise ValueError("shared must be a context made for this model by InfoKVLlama.shared_context()")
        self._shared = shared
        try:
            self.parallel = _parallel(parallel)
        except BudgetError:
            self._free()
            raise
        self._engine_args = dict(
            policy=policy, budget=None if budget_mib is not None else budget, budget_mib=budget_mib, buffer=buffer,
            n_sink=n_sink, n_recent=n_recent, window=window, n_batch=n_batch, n_threads=n_threads, seed=seed,
            max_context=n_ctx, flash_attn=flash_attn, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
            prompt_probe=prompt_probe, max_checkpoints=max_checkpoints, check_invariants=check_invariants,
        )
        if shared is not None:
            self._engine_args["shared"] = shared
        try:
            self._engine = Engine(self.model, **self._engine_args)
        except BaseException:
            self._free()
            raise
        self._prompt = PromptCache()
        self._formatter = None
        self._active = False

    @classmethod
    def from_settings(cls, model_path: str | os.PathLike[str] | Model, settings: Settings,
                      **kwargs: Any) -> InfoKVLlama:
        """Load with a :class:`~infokv_local.settings.Settings` (``kwargs``: e.g. ``check_invariants``)."""
        return cls(model_path, **settings.as_kwargs(), **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str, *, cache_dir: str | None = None,
                        **kwargs: Any) -> InfoKVLlama:
        """Load ``filename`` (a name or a glob) of a Hugging Face Hub repository, downloaded through
        huggingface-hub or taken from its local cache when offline."""
        from ..models.hub import hf_model_file

        return cls(hf_model_file(repo_id, filename, cache_dir=cache_dir), **kwargs)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise ValueError("this InfoKVLlama is closed")
        return self._engine

    def _refuse_while_streaming(self, what: str) -> None:
        if self._active:
            raise RuntimeError(f"a streamed completion is still open on this InfoKVLlama: read it to the end or "
                               f"close() it before {what}")

    # ---- completion and chat (:mod:`.completion`, :mod:`.chat`) -----------------------------------
    @overload
    def __call__(self, prompt: str | bytes, *, stream: Literal[False] = ..., **kwargs: Any) -> Completion: ...
    @overload
    def __call__(self, prompt: str | bytes, *, stream: Literal[True], **kwargs: Any) -> Iterator[CompletionChunk]: ...
    @overload
    def __call__(self, prompt: str | bytes, *, stream: bool, **kwargs: Any) -> CompletionResult: ...

    def __call__(self, prompt: str | bytes, *, stream: bool = False, **kwargs: Any) -> CompletionResult:
        """Same as :meth:`create_completion` (as ``Llama.__call__``)."""
        return self.create_completion(prompt, stream=stream, **kwargs)

    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ...,
                          stream: Literal[False] = ..., seed: int | None = ..., logprobs: int | None = ...,
                          echo: bool = ..., grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> Completion: ...
    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ..., *, stream: Literal[True],
                          seed: int | None = ..., logprobs: int | None = ..., echo: bool = ...,
                          grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> Iterator[CompletionChunk]: ...
    @overload
    def create_completion(self, prompt: str | bytes, max_tokens: int | None = ..., temperature: float = ...,
                          top_p: float = ..., min_p: float = ..., top_k: int = ...,
                          stop: str | bytes | list[str | bytes] | None = ..., frequency_penalty: float = ...,
                          presence_penalty: float = ..., repeat_penalty: float = ..., stream: bool = ...,
                          seed: int | None = ..., logprobs: int | None = ..., echo: bool = ...,
                          grammar: Any = ...,
                          logit_bias: dict[int | str, float] | None = ..., cancel: threading.Event | None = ...,
                          max_prompt_tokens: int | None = ...) -> CompletionResult: ...

    def create_completion(
        self,
        prompt: str | bytes,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        top_k: int = 40,
        stop: str | bytes | list[str | bytes] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        stream: bool = False,
        seed: int | None = None,
        logprobs: int | None = None,
        echo: bool = False,
        grammar: Any = None,
        logit_bias: dict[int | str, float] | None = None,
        cancel: threading.Event | None = None,
        max_prompt_tokens: int | None = None,
    ) -> CompletionResult:
        """Complete ``prompt``; the arguments and the result are those of ``Llama.create_completion``
        (pass them by keyword: ``suffix``, llama-cpp-python's second positional argument, is not supported).

        ``max_tokens`` None or <= 0 means until an end-of-generation token (at most the model's
        trained context length of new tokens), as in llama-cpp-python. ``logprobs=n``: per generated
        token, its log-probability and the ``n`` most probable tokens (from the logits the token was
        sampled from, before any grammar). ``echo``: the prompt is returned before the completion.
        ``grammar``: a GBNF text or a ``llama_cpp.LlamaGrammar``, applied by llama.cpp's grammar
        sampler. ``logit_bias``: token id (an int, or its string as in the OpenAI API) to a value added to
        its logit before sampling; ``-inf`` bans it. The result's ``usage`` has a ``kv`` block; with
        ``stream=True`` every chunk has one too.

        Not in llama-cpp-python: ``cancel``, a ``threading.Event`` that another thread may set to stop the
        request at the next prompt chunk or generated token (the call, or the stream, raises
        :class:`~infokv_local.errors.RequestCancelled`; what was read and generated stays cached, and the
        next call reuses it); ``max_prompt_tokens``, the most prompt tokens the call may read (the part
        of the prompt not cached already): a longer one raises
        :class:`~infokv_local.errors.PromptTooLongError` before anything changes, found without
        tokenizing all of a huge prompt.
        """
        return completion.create_completion(
            self, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, min_p=min_p, top_k=top_k,
            stop=stop, frequency_penalty=frequency_penalty, presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty, stream=stream, seed=seed, logprobs=logprobs, echo=echo, grammar=grammar,
            logit_bias=logit_bias, cancel=cancel, max_prompt_tokens=max_prompt_tokens)

    @overload
    def create_chat_completion(self, messages: list[dict[str, Any]], temperature: float = ..., top_p: float = ...,
                               top_k: int = ..., min_p: float = ..., stream: Literal[False] = ...,
                               **kwargs: Any) -> ChatCompletion: ...
    @overload
    def create_chat_completion(self, messages: list[dict[str, Any]], temperature: float = ..., top_p: float = ...,
                               top_k: int = ..., min_p: float = ..., *, stream: Literal[True],
                               **kwargs: Any) -> Iterator[ChatCompletionChunk]: ...
    @overload
    def create_chat_completion(self, messages: list[dict[str, Any]], temperature: float = ..., top_p: float = ...,
                               top_k: int = ..., min_p: float = ..., stream: bool = ...,
                               **kwargs: Any) -> ChatCompletionResult: ...

    def create_chat_completion(  # type: ignore[misc]  # the overloads name only the arguments that pick the type
        self,
        messages: list[dict[str, Any]],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        stream: bool = False,
        stop: str | bytes | list[str | bytes] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        logprobs: bool | None = None,
        top_logprobs: int | None = None,
        response_format: dict[str, Any] | None = None,
        grammar: Any = None,
        logit_bias: dict[int | str, float] | None = None,
        cancel: threading.Event | None = None,
        max_prompt_tokens: int | None = None,
    ) -> ChatCompletionResult:
        """Reply to a conversation, formatted by the chat template in the GGUF metadata.

        Arguments and result as ``Llama.create_chat_completion``. Pass the whole history each
        turn: the part the cache already holds is not prefilled again. ``logprobs=True`` adds the
        OpenAI ``logprobs: {"content": [...]}`` block with ``top_logprobs`` most probable tokens per
        token; ``response_format={"type": "json_object"}`` (optionally with a ``"schema"``) or
        ``{"type": "json_schema", "json_schema": {"schema": ...}}`` constrains the reply to JSON
        through llama.cpp's grammar sampler; ``grammar`` takes a GBNF text or a ``LlamaGrammar``;
        ``logit_bias``, ``cancel`` and ``max_prompt_tokens`` as in :meth:`create_completion`.
        """
        return chat.create_chat_completion(
            self, messages, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, stream=stream,
            stop=stop, seed=seed, max_tokens=max_tokens, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, repeat_penalty=repeat_penalty, logprobs=logprobs,
            top_logprobs=top_logprobs, response_format=response_format, grammar=grammar, logit_bias=logit_bias,
            cancel=cancel, max_prompt_tokens=max_prompt_tokens)

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        return chat.chat_formatter(self)

    # ---- what the cache holds (:mod:`.kv`) --------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.engine.kv_bytes_per_cell

    @staticmethod
    def budget_mib_for(model: Model, tokens: int) -> float:
        """MiB of KV memory that ``tokens`` cached tokens take for this model (with the f16 cache and the
        part of the memory that does not grow, which a ``budget_mib`` includes)."""
        return kv.budget_mib_for(model, tokens)

    def kv_stats(self) -> KVStats:
        """The ``kv`` block: policy, budget, cells in use (now and the most at any step since the
        conversation began), KV bytes, compressions and evicted tokens, since the last reset.
        Waits for the model's lock (a step of another request on the model ends first)."""
        return kv.kv_stats(self)

    def cell_history(self) -> list[tuple[int, int]]:
        """(tokens read so far, cells in use) before and after every engine step since the last reset:
        the saw-tooth of grow-and-compress."""
        return kv.cell_history(self)

    def cache_map(self) -> CacheMap:
        """Every token of the sequence, whether it is still cached, and the policy's score of it."""
        return kv.cache_map(self)

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the context (and the model, unless it was passed in loaded)."""
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._owns_model:
            self.model.close()

    def __enter__(self) -> InfoKVLlama:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # no lock: the collector may run this on a thread that holds it; nobody else can use this context
        if getattr(self, "_lock", None) is not None:
            self._free()

    def reset(self) -> None:
        """Forget the conversation: the cache is emptied and the statistics restart.

        Refused (``RuntimeError``) while a stream of this object is open: close it first."""
        self._refuse_while_streaming("reset()")
        with self._lock:
            self.engine.reset()
            self._prompt.clear()

    def configure(self, *, policy: str | Policy | None = None, budget: int | None = None,
                  budget_mib: float | None = None, buffer: int | None = None, n_sink: int | None = None,
                  n_recent: int | None = None, cache_type_k: str | None = None,
                  cache_type_v: str | None = None, prompt_probe: bool | None = None) -> None:
        """Change the policy, the budget or the cache's data types. The cache is rebuilt: the next call
        prefills its prompt again.

        On a bad value (e.g. a budget too small for the protected tokens) nothing changes. Refused
        (``RuntimeError``) while a stream of this object is open: close it first.
        """
        self._refuse_while_streaming("configure()")
        args = dict(self._engine_args)
        for key, value in dict(policy=policy, buffer=buffer, n_sink=n_sink, n_recent=n_recent,
                               cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                               prompt_probe=prompt_probe).items():
            if value is not None:
                args[key] = value
        if budget is not None or budget_mib is not None:
            args["budget"], args["budget_mib"] = budget, budget_mib
        with self._lock:
            if self._shared is None:
                new = Engine(self.model, **args)  # raises before anything is replaced
                self.engine.close()
            else:  # the new engine takes this object's sequence: the old one gives it back first
                self.engine.close()
                try:
                    new = Engine(self.model, **args)
                except BaseException:
                    self._engine = Engine(self.model, **self._engine_args)
                    raise
            self._engine, self._engine_args = new, args
            self._prompt.clear()

    # ---- several prompts at once ------------------------------------------------------------------
    def shared_context(self, n_seq: int, policies: Sequence[str | Policy] | None = None,
                       capacity: int | None = None) -> SharedContext:
        """A context of ``n_seq`` sequences for objects like this one (``InfoKVLlama(model, shared=...)``): its
        statistics cover ``policies`` (default this object's), each sequence holds ``capacity`` cells (default
        this object's budget + buffer), and its flash-attention setting, cache types, window and threads are
        this object's. Close it after the objects made on it."""
        a = self._engine_args
        policies = list(policies) if policies is not None else [a["policy"]]
        with self._lock:
            return SharedContext.for_policies(
                self.model, n_seq, policies, capacity=capacity or self.engine.capacity, window=a["window"],
                n_batch=a["n_batch"], n_threads=a["n_threads"], flash_attn=a["flash_attn"],
                cache_type_k=a["cache_type_k"], cache_type_v=a["cache_type_v"], lock=self._lock)

    def clone_settings(self) -> dict[str, Any]:
        """This object's settings as :class:`InfoKVLlama` keyword arguments (the budget in tokens, as resolved)."""
        a = self._engine_args
        e = self.engine
        return dict(policy=a["policy"], budget=e.budget, budget_mib=None, buffer=a["buffer"], n_sink=a["n_sink"],
                    n_recent=a["n_recent"], window=a["window"], n_batch=a["n_batch"], n_threads=a["n_threads"],
                    seed=self.seed, n_ctx=a["max_context"], flash_attn=a["flash_attn"],
                    cache_type_k=a["cache_type_k"], cache_type_v=a["cache_type_v"],
                    prompt_probe=a["prompt_probe"], max_checkpoints=a["max_checkpoints"],
                    check_invariants=a["check_invariants"], parallel=self.parallel)

    def run_together(self, items: Sequence[T], work: Callable[[int, InfoKVLlama, T], None], parallel: int,
                     policies: Sequence[str | Policy] | None = None, capacity: int | None = None,
                     stop: threading.Event | None = None) -> None:
        """``work(worker, llm, item)`` for every item, on ``parallel`` objects like this one whose sequences share
        one context (:meth:`shared_context` with ``policies`` and ``capacity``), each on a thread of its own
        that takes the next item when it is done (``worker`` numbers the objects, 0..parallel - 1). Returns
        once every item is done, or, after ``stop`` is set, once the items in progress end; a Ctrl-C in the
        calling thread sets ``stop`` (when given), waits for them and is raised."""
        with self.shared_context(parallel, policies, capacity) as shared:
            llms = [InfoKVLlama(self.model, shared=shared, **self.clone_settings()) for _ in range(parallel)]
            try:
                run_workers(items, parallel, lambda w, item: work(w, llms[w], item), stop)
            finally:
                for llm in llms:
                    llm.close()

    def create_completions(self, prompts: Sequence[str | bytes], *, parallel: int | None = None,
                           **kwargs: Any) -> list[Completion]:
        """:meth:`create_completion` of each prompt (the same ``kwargs`` for all), ``parallel`` at a time
        (default this object's ``parallel``) in one shared context: each prompt is
        read alone, and the replies' tokens are decoded together, one ``llama_decode`` per step for every
        reply being generated. Each prompt gets a sequence of its own with this object's policy and budget,
        and a fresh cache (this object's conversation is untouched). Returns the results in the order of
        ``prompts``; the first error of any prompt is raised once every prompt has ended. A policy that does
        not evict (``full``) runs the prompts one after another. Streaming is not offered here."""
        if kwargs.get("stream"):
            raise ValueError("create_completions does not stream: call create_completion(stream=True) per prompt")
        prompts = list(prompts)
        n = min(len(prompts), _parallel(self.parallel if parallel is None else parallel))
        results: list[Completion | None] = [None] * len(prompts)
        errors: list[tuple[int, BaseException]] = []
        if not prompts:
            return []
        if not make_policy(self._engine_args["policy"]).evicts or n == 1:
            one = InfoKVLlama(self.model, **self.clone_settings())
            with one:
                for i, p in enumerate(prompts):
                    one.reset()
                    results[i] = one.create_completion(p, **kwargs)
            return [r for r in results if r is not None]
        guard = threading.Lock()

        def work(_: int, llm: InfoKVLlama, item: tuple[int, str | bytes]) -> None:
            i, p = item
            try:
                llm.reset()
                results[i] = llm.create_completion(p, **kwargs)
            except BaseException as e:  # noqa: BLE001 - raised below, after every prompt ended
                with guard:
                    errors.append((i, e))

        self.run_together(list(enumerate(prompts)), work, n)
        if errors:
            raise min(errors, key=lambda x: x[0])[1]
        return [r for r in results if r is not None]

    # ---- tokens ----------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Tokens of ``text`` (llama.cpp's tokenizer; same signature as ``Llama.tokenize``)."""
        return self.model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> bytes:
        return b"".join(token_bytes(self.model, t, special) for t in tokens)

    # ---- parking a conversation -------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        """Tokens of the conversation held now (cached or evicted), as ``Llama.n_tokens``."""
        return len(self.engine.tokens)

    def reusable_tokens(self, prompt: str | bytes) -> int:
        """How many tokens of the conversation held now a completion of ``prompt`` (text, or its UTF-8 bytes)
        would keep instead of prefilling them (at most; 0: it starts over). Reads no llama.cpp state: a
        server asks every idle instance which one should take a request."""
        return self._prompt.reusable(prompt, len(self.engine.tokens))

    def export_state(self) -> SavedConversation:
        """The conversation as it stands (the compressed cache, the signals, the text it holds), to be
        continued later with :meth:`import_state` on this or another instance, without prefill."""
        self._refuse_while_streaming("export_state()")
        with self._lock:
            return SavedConversation(engine=self.engine.snapshot(), segments=self._prompt.segments(),
                                     calls=self._calls, engine_args=dict(self._engine_args))

    def import_state(self, state: SavedConversation) -> None:
        """Continue a conversation saved by :meth:`export_state`. The cache settings (policy, budget...)
        become the saved ones if they differ; nothing is decoded."""
        self._refuse_while_streaming("import_state()")
        if state.engine_args != self._engine_args:
            a = state.engine_args
            self.configure(policy=a["policy"], budget=a["budget"], budget_mib=a["budget_mib"], buffer=a["buffer"],
                           n_sink=a["n_sink"], n_recent=a["n_recent"], cache_type_k=a["cache_type_k"],
                           cache_type_v=a["cache_type_v"], prompt_probe=a.get("prompt_probe", False))
        with self._lock:
            try:
                self.engine.restore(state.engine)
            except BaseException:
                self._prompt.clear()
                raise
            self._prompt.restore(state.segments)
            self._calls = state.calls

    def fork_state(self, state: SavedConversation) -> None:
        """Go on from a conversation another object saved (:meth:`export_state`) with this object's own policy:
        a prompt read once (:meth:`prefill`) serves several policies. Allowed while the saved cache was never
        compressed and its policy had the same signals recorded as this one's (SnapKV, TOVA and R-KV; InfoKV and
        its R-KV variant; StreamingLLM, KeyDiff, context-shift and random), with every other cache setting
        (budget, buffer, window, cache types, flash attention) the same: this object then holds exactly what
        reading the prompt itself would have left. Otherwise :class:`~infokv_local.errors.ForkRefused`, and
        this object's conversation is untouched. Nothing is decoded; the request count (the default seed) stays
        this object's."""
        self._refuse_while_streaming("fork_state()")
        with self._lock:
            try:
                self.engine.fork(state.engine)
            except ForkRefused:
                raise
            except BaseException:
                self._prompt.clear()
                raise
            self._prompt.restore(state.segments)

    def prefill(self, prompt: str | bytes | list[dict[str, Any]], *, cancel: threading.Event | None = None,
                max_prompt_tokens: int | None = None) -> int:
        """Read a prompt into the cache without generating (llama-cpp-python's ``eval``, with text): a prompt
        as :meth:`create_completion` reads it, or a chat's ``messages`` (a list) through the chat template as
        :meth:`create_chat_completion` reads them, keeping what the cache holds of it already. The next request
        with the same prompt reads nothing and takes its first token from the logits kept; :meth:`export_state`
        then hands the read prompt on (:meth:`fork_state`). ``cancel`` and ``max_prompt_tokens`` as in
        :meth:`create_completion`. Returns the number of tokens read."""
        self._refuse_while_streaming("prefill()")
        if isinstance(prompt, list):
            text, add_bos = chat.chat_prompt(self, prompt)
        else:
            text, add_bos = prompt_of(prompt), True
        self._active = True
        try:
            plan, _, n_fed = completion.read_prompt(self, text, add_bos, completion._prompt_limit(max_prompt_tokens),
                                                    cancel)
            with self._lock, sigint_deferred():
                self._prompt.add_fed(self.model, plan, n_fed)
        finally:
            self._active = False
        return n_fed


@dataclass
class SavedConversation:
    """A conversation parked by :meth:`InfoKVLlama.export_state`."""

    engine: EngineSnapshot
    segments: list[tuple[bytes, int]]
    calls: int
    engine_args: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return self.engine.nbytes + sum(len(b) for b, _ in self.segments)

    def reusable_tokens(self, prompt: str | bytes) -> int:
        """As :meth:`InfoKVLlama.reusable_tokens`, for this conversation once imported."""
        cache = PromptCache()
        cache.restore(self.segments)
        return cache.reusable(prompt, len(self.engine.tokens))

"""Every error infokv-local raises on purpose: one hierarchy under :class:`InfoKVError`.

Each message tells the user what is wrong and what to do. The errors that describe bad arguments
are also :class:`ValueError` (so ``except ValueError`` keeps working for them). They are declared
here only; :mod:`infokv_local.engine` and :mod:`infokv_local.llamacpp.context` re-export the ones they raise.
"""


class InfoKVError(Exception):
    """Base class of every error infokv-local raises on purpose."""


class UnpatchedLibraryError(InfoKVError):
    """The native parts are missing or stale: the llama.cpp library lacks the infokv patches, or the
    kernels (``infokv_local._kernels``) are not built."""


class ModelFileError(InfoKVError):
    """The model file is missing, unreadable or not a valid GGUF file."""


class UnsupportedArchitectureError(InfoKVError):
    """The model's memory (sliding-window, recurrent, hybrid) does not allow evicting single tokens."""


class DecodeError(InfoKVError):
    """llama_decode failed for a reason other than a full cache."""


class CacheFull(InfoKVError):
    """llama_decode found no free cells for the batch (nothing was changed): evict and retry."""


class BudgetError(InfoKVError, ValueError):
    """A size is invalid: the budget cannot hold the protected tokens (sinks plus recent window) and
    anything else, or a budget, buffer, window or batch size is zero or negative."""


class ContextFullError(InfoKVError, ValueError):
    """A policy that does not evict (``full``) ran out of context; nothing was changed."""


class PolicyError(InfoKVError, ValueError):
    """An unknown policy name, or a parameter the policy does not have or cannot take."""


class BatchInputError(InfoKVError, ValueError):
    """An invalid line of a batch input file: bad JSON, a missing or duplicate id, an unknown or invalid
    parameter (reported with its file and line number)."""


class CacheSettingsError(InfoKVError, ValueError):
    """An unknown KV-cache data type, a flash-attention setting the policy or the cache type rules
    out (H2O needs flash attention off; a quantized V cache needs it on), or a negative number of checkpoints."""


class EmptyPromptError(InfoKVError, ValueError):
    """Nothing to generate from: the prompt is empty and no sequence is cached."""


class InvalidTextError(InfoKVError, ValueError):
    """Text that cannot be turned into tokens (e.g. lone surrogates that stand for no bytes)."""


class InvalidTokenError(InfoKVError, ValueError):
    """A token id that is not in the model's vocabulary."""


class PromptTooLongError(InfoKVError, ValueError):
    """A prompt that would need more tokens read than the request allows (``max_prompt_tokens``); nothing was
    read or changed."""


class ForkRefused(InfoKVError, ValueError):
    """A saved prompt that cannot go on with this policy or these settings (its cache was compressed, or it was
    read with other signals or cache settings): read the prompt instead. Nothing was changed."""


class RequestCancelled(InfoKVError):
    """A request stopped before it finished because its ``cancel`` event was set (its client went away, or
    the server is stopping); the cache keeps what was read and generated until then."""


class RpcError(InfoKVError):
    """An RPC server (``--rpc``) that is malformed, unreachable or does not answer as llama.cpp's does, or an
    RPC server that cannot start."""


__all__ = [
    "BatchInputError", "BudgetError", "CacheFull", "CacheSettingsError", "ContextFullError", "DecodeError",
    "EmptyPromptError", "ForkRefused", "InfoKVError", "InvalidTextError", "InvalidTokenError",
    "ModelFileError", "PolicyError", "PromptTooLongError",
    "RequestCancelled", "RpcError",
    "UnpatchedLibraryError", "UnsupportedArchitectureError",
]

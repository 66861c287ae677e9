"""Errors raised by infokv-local, each with a message that tells the user what to do."""


class InfoKVError(Exception):
    """Base class of every error infokv-local raises on purpose."""


class UnpatchedLibraryError(InfoKVError):
    """The llama.cpp library loaded by llama-cpp-python lacks the infokv patches."""


class ModelFileError(InfoKVError):
    """The model file is missing, unreadable or not a valid GGUF file."""


class UnsupportedArchitectureError(InfoKVError):
    """The model's memory (sliding-window, recurrent, hybrid) does not allow evicting single tokens."""


class DecodeError(InfoKVError):
    """llama_decode failed for a reason other than a full cache."""

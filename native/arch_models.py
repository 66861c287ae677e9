"""Write small random-weight GGUF models of many architectures, for the architecture tests.

llama.cpp's own ``tests/test-llama-archs.cpp`` (vendored in the pinned llama-cpp-python sdist) knows the
tensors and hyperparameters of every architecture its model saver supports; with ``-o DIR`` it writes one
small model per architecture (2 layers, 256-wide, a vocabulary of 128, random weights) instead of testing
backends. This compiles that one file against the installed patched libraries (``libllama`` exports the
saver; ``libllama-common`` is installed beside it), with the patched headers, and runs it. The models are
cached under ``$INFOKV_CACHE/arch-models`` by the patches' and the sdist's hash, so a second call is free.

    python native/arch_models.py --out DIR [--archs REGEX]   # prints one model path per line
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from infokv_local.install.llama import cache_dir, fetch_sdist, patch_files

# the architectures of the test matrix (llama.cpp's names; the file is NAME-dense.gguf or NAME-moe.gguf)
DEFAULT_ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe", "phi3", "mistral3", "smollm3", "glm4", "deepseek2",
                 "gemma2", "gemma3", "gpt-oss", "cohere2", "olmo2", "exaone4", "llama4", "granitehybrid",
                 "jamba", "falcon-h1", "nemotron_h", "qwen35", "qwen3next", "lfm2", "mamba2")


def _libs() -> tuple[Path, Path]:
    import llama_cpp  # the installed patched build

    lib = Path(llama_cpp.__file__).parent / "lib"
    common = lib.parent.parent / "lib"  # site-packages/lib: llama.cpp's CMake install of libllama-common
    for d, name in ((lib, "libllama.so"), (common, "libllama-common.so")):
        if not (d / name).exists():
            raise SystemExit(f"{name} not found in {d}: install the patched build first (make setup)")
    return lib, common


def _key(archs: tuple[str, ...]) -> str:
    h = hashlib.sha256(fetch_sdist().name.encode())
    for p in patch_files():
        h.update(p.read_bytes())
    h.update(" ".join(archs).encode())
    return h.hexdigest()[:16]


def build_writer(work: Path) -> Path:
    """Compile test-llama-archs against the installed libraries; returns the program."""
    with tarfile.open(fetch_sdist()) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        for m in members:
            m.name = m.name.split("/", 1)[1]
        tar.extractall(work, members=members, filter="tar")
    for p in patch_files():  # the headers the program includes must be the ones the library was built with
        subprocess.run(["patch", "-p1", "--forward", "--batch", "-s", "-i", str(p)], cwd=work, check=True,
                       stdout=subprocess.DEVNULL)
    src = work / "vendor" / "llama.cpp"
    lib, common = _libs()
    exe = work / "test-llama-archs"
    cmd = ["g++", "-std=c++17", "-O1", "-o", str(exe), str(src / "tests" / "test-llama-archs.cpp"),
           *(f"-I{src / d}" for d in ("common", "include", "ggml/include", "src", "vendor")),
           f"-L{lib}", f"-L{common}", "-lllama", "-lllama-common", "-lggml", "-lggml-base",
           f"-Wl,-rpath,{lib}:{common}"]
    subprocess.run(cmd, check=True)
    return exe


def write_models(out: Path, archs: tuple[str, ...] = DEFAULT_ARCHS) -> list[Path]:
    """The models of ``archs`` (written once, then taken from the cache), copied into ``out``."""
    cached = cache_dir() / "arch-models" / _key(archs)
    if not cached.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            exe = build_writer(Path(tmp))
            staged = Path(tmp) / "models"
            staged.mkdir()
            pattern = "^(" + "|".join(archs) + ")$"
            subprocess.run([str(exe), "-a", pattern, "-o", str(staged), "-s", "1"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(staged, cached.with_name(cached.name + ".tmp"), dirs_exist_ok=True)
            cached.with_name(cached.name + ".tmp").rename(cached)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in sorted(cached.glob("*.gguf")):
        dest = out / f.name
        shutil.copyfile(f, dest)
        paths.append(dest)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to write the models into")
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="comma-separated llama.cpp architecture names")
    args = ap.parse_args()
    for p in write_models(args.out, tuple(a.strip() for a in args.archs.split(",") if a.strip())):
        print(p)


if __name__ == "__main__":
    main()

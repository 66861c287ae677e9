"""Compile the cffi extension ``infokv_local._kernels`` against the installed llama-cpp-python wheel.

Run after the patched wheel is installed (``python -m infokv_local install`` does both, this step in a
new process so that it finds the new wheel). The module links to the wheel's ``libllama`` with an rpath,
so it uses exactly the library llama-cpp-python loads; it is written next to the package's modules.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "kernels.cpp"
PACKAGE = Path(__file__).resolve().parent.parent  # infokv_local/

CDEF = """
struct llama_context;
void infokv_topk_entropy(const float * logits, int64_t n_rows, int64_t n_vocab, int64_t k, float * out,
                         int32_t n_threads);
void infokv_topk_entropy_ctx(struct llama_context * ctx, const int32_t * idx, int64_t n_idx, int64_t n_vocab,
                             int64_t k, float * out, int32_t n_threads);
struct ggml_tensor;
int infokv_tensor_desc(const struct ggml_tensor * t, char * name, int64_t name_cap, int64_t * ne);
void infokv_tensor_f32(const struct ggml_tensor * t, float * out);
"""


def wheel_dirs() -> tuple[Path, Path]:
    """The installed llama-cpp-python's headers and libraries."""
    import llama_cpp

    pkg = Path(llama_cpp.__file__).resolve().parent
    include = pkg / "include"
    if not (include / "llama.h").exists():
        include = pkg.parent / "include"
    return include, pkg / "lib"


def build_kernels() -> None:
    """Compile the kernels unless the ones built last match the source and the library (a stamp says)."""
    import cffi

    include, lib = wheel_dirs()
    key = hashlib.sha256(SOURCE.read_bytes() + CDEF.encode() + str(lib).encode()).hexdigest()[:16]
    stamp = PACKAGE / ".kernels.key"
    built = list(PACKAGE.glob("_kernels*.so"))
    if built and stamp.exists() and stamp.read_text().strip() == key:
        print("kernels up to date")
        return
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(
        "infokv_local._kernels",
        f'#include "{SOURCE}"',
        source_extension=".cpp",
        include_dirs=[str(include)],
        library_dirs=[str(lib)],
        libraries=["llama", "ggml-base"],
        extra_compile_args=["-O3", "-std=c++17", "-pthread"],
        extra_link_args=[f"-Wl,-rpath,{lib}", "-pthread"],
    )
    with tempfile.TemporaryDirectory(prefix="infokv-kernels-") as tmp:
        so = Path(ffi.compile(tmpdir=tmp, verbose=False))
        for old in built:
            old.unlink()
        shutil.move(str(so), PACKAGE / so.name)
    stamp.write_text(key + "\n")
    print(f"built infokv_local._kernels ({PACKAGE / so.name})")


if __name__ == "__main__":
    build_kernels()

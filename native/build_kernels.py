"""Compile the cffi extension ``infokv_local._kernels`` against the installed llama-cpp-python wheel.

Run after ``native/build_llama.py`` (the Makefile does both). The module links to the wheel's
``libllama`` with an rpath, so it uses exactly the library llama-cpp-python loads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cffi
import llama_cpp

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "native" / "kernels.cpp"

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
    pkg = Path(llama_cpp.__file__).resolve().parent
    include = pkg / "include"
    if not (include / "llama.h").exists():
        include = pkg.parent / "include"
    return include, pkg / "lib"


def main() -> None:
    include, lib = wheel_dirs()
    key = hashlib.sha256(SOURCE.read_bytes() + CDEF.encode() + str(lib).encode()).hexdigest()[:16]
    stamp = ROOT / "infokv_local" / ".kernels.key"
    built = list((ROOT / "infokv_local").glob("_kernels*.so"))
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
    ffi.compile(tmpdir=str(ROOT), verbose=False)
    stamp.write_text(key + "\n")
    for leftover in ROOT.glob("infokv_local/_kernels.cpp"):
        leftover.unlink()
    print("built infokv_local._kernels")


if __name__ == "__main__":
    main()

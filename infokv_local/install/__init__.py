"""``python -m infokv_local install``: put the native parts into the running interpreter's environment.

The patched llama-cpp-python (:mod:`.llama`: fetched, patched, built once and cached, then installed with
pip) and the package's native kernels (:mod:`.kernels`). Needs only the standard library until the wheel
is installed, so it runs right after ``pip install infokv-local`` in any environment.
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "install", help="build (once, cached) and install the patched llama.cpp and the native kernels here",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Builds the patched llama-cpp-python for this interpreter (about 4 minutes on 2 cores the "
                    "first time; the wheel is cached by patch, CPU and CMAKE_ARGS under ~/.cache/infokv-local), "
                    "installs it with pip, then compiles the native kernels. GPU builds: CMAKE_ARGS as for "
                    "llama-cpp-python, e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\".",
        epilog="examples:\n  python -m infokv_local install\n  CMAKE_ARGS=\"-DGGML_CUDA=on\" python -m infokv_local "
               "install\n  python -m infokv_local install --stock   # the unpatched library, for comparisons",
    )
    p.add_argument("--stock", action="store_true",
                   help="build (or reuse) the unpatched library and print its folder; installs nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from . import llama

    if args.stock:
        print(llama.stock_lib_dir())
        return 0
    llama.install_patched()
    # a new process: this one may have imported another llama-cpp-python, or none
    return subprocess.run([sys.executable, "-m", "infokv_local.install.kernels"]).returncode

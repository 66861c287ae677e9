"""Build and install the patched llama-cpp-python wheel (and optionally a stock one for comparison).

The pinned llama-cpp-python source distribution is fetched from the package registry, the unified
diffs in ``patches/`` (shipped with this package) are applied in order, and the wheel is built with
scikit-build-core. Wheels are cached under ``$INFOKV_CACHE`` (default ``~/.cache/infokv-local``) keyed
by the hash of the patches, the CMake flags, the CPU and the Python/platform tag, so a second install
takes seconds; ccache is used when available so that even a changed patch rebuilds quickly.

    python -m infokv_local install            # build (or reuse) and install the patched wheel, then the kernels
    python -m infokv_local install --stock    # build (or reuse) the unpatched library, print its lib dir

GPU builds pass CMake flags as llama-cpp-python does: ``CMAKE_ARGS="-DGGML_CUDA=on"``.
Standard library only: it runs before llama-cpp-python is installed.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PATCH_DIR = Path(__file__).resolve().parent / "patches"
# keep the wheel small and the build short: the Python package needs only the libraries
BASE_CMAKE_ARGS = [
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    # llama.cpp's RPC backend (a model's layers on other machines: --rpc, `infokv_local rpc-server`);
    # one more source file, and nothing changes for a run that names no server
    "-DGGML_RPC=ON",
]


def cache_dir() -> Path:
    return Path(os.environ.get("INFOKV_CACHE", Path.home() / ".cache" / "infokv-local"))


def patch_files() -> list[Path]:
    return sorted(PATCH_DIR.glob("*.patch"))


def user_cmake_args() -> str:
    return os.environ.get("CMAKE_ARGS", "").strip()


def cpu_flags() -> set[str]:
    """The instruction-set flags of this machine's CPU (Linux; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def native_compiler_flags() -> list[str]:
    """C/C++ flags added to ggml's native (-march=native) build on this machine.

    On CPUs with AMX the vendored ggml's AMX kernels die with SIGILL: worker threads run tile
    instructions without the per-thread XTILEDATA permission, and the tile configuration on the stack
    can be optimised away (llama.cpp PR #26954, issue #28756; seen here on a Xeon with amx_tile). Until
    the vendored llama.cpp carries the fix, the build leaves AMX out (AVX-512 kernels are used instead).
    """
    if platform.machine().lower() in ("x86_64", "amd64") and "amx_tile" in cpu_flags():
        return ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    return []


def build_key(patched: bool) -> str:
    h = hashlib.sha256()
    h.update(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}\n".encode())
    h.update(f"{sys.implementation.cache_tag} {sysconfig.get_platform()}\n".encode())
    h.update(" ".join(BASE_CMAKE_ARGS + [user_cmake_args()]).encode())
    # -march=native: a wheel is built for this CPU (a shared cache must not hand it to another one)
    h.update(" ".join(sorted(cpu_flags()) + native_compiler_flags()).encode())
    if patched:
        for p in patch_files():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return ("patched-" if patched else "stock-") + h.hexdigest()[:16]


def fetch_sdist() -> Path:
    dest = cache_dir() / "sdist"
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (dest / name).exists():
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest)],
            check=True,
        )
    return dest / name


def prepare_source(patched: bool) -> Path:
    # one fixed source path for both flavours, so ccache hits across rebuilds and flavours
    src = cache_dir() / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    with tarfile.open(fetch_sdist()) as tar:
        members = tar.getmembers()
        for m in members:
            m.name = m.name.split("/", 1)[1] if "/" in m.name else ""
        tar.extractall(src, members=[m for m in members if m.name], filter="tar")
    # the sdist ships git metadata of its vendored checkout; it is not ours to build with
    for stray in (src / ".git", src / "vendor" / "llama.cpp" / ".git"):
        if stray.is_dir():
            shutil.rmtree(stray)
        elif stray.exists():
            stray.unlink()
    if patched:
        for p in patch_files():
            print(f"applying {p.name}", flush=True)
            subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(p)], cwd=src, check=True,
                           stdout=subprocess.DEVNULL)
    return src


def build_wheel(patched: bool) -> Path:
    key = build_key(patched)
    out = cache_dir() / "wheels" / key
    wheels = sorted(out.glob("*.whl"))
    if wheels:
        return wheels[0]
    src = prepare_source(patched)
    cmake_args = BASE_CMAKE_ARGS[:]
    env = dict(os.environ)
    if shutil.which("ccache"):
        cmake_args += ["-DCMAKE_C_COMPILER_LAUNCHER=ccache", "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache"]
        env["CCACHE_BASEDIR"] = str(src)
        env.setdefault("CCACHE_DIR", str(cache_dir() / "ccache"))
        env.setdefault("CCACHE_MAXSIZE", "5G")
    env["CMAKE_ARGS"] = " ".join(cmake_args + [user_cmake_args()]).strip()
    extra = native_compiler_flags()
    if extra:  # CMake takes CFLAGS/CXXFLAGS as the start of CMAKE_C(XX)_FLAGS: user CMAKE_ARGS still apply
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = " ".join([env.get(var, ""), *extra]).strip()
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} ({key}); CMAKE_ARGS={env['CMAKE_ARGS']}"
          + (f"; CFLAGS/CXXFLAGS += {' '.join(extra)}" if extra else ""), flush=True)
    # fixed too: absolute paths end up in the compiler commands. INFOKV_KEEP_BUILD=1 keeps one per build key, so
    # that a build killed midway goes on where it stopped (the GPU check, on a machine lent for minutes): the
    # source is extracted with its archived times, so ninja recompiles only what is missing and the patched files
    keep = keep_build()
    build_dir = cache_dir() / (f"build-{key}" if keep else "build")
    if not keep:
        shutil.rmtree(build_dir, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp),
                    f"--config-settings=build-dir={build_dir}", str(src)], env=env, check=True)
    if not keep:
        shutil.rmtree(build_dir, ignore_errors=True)
    tmp.rename(out)
    shutil.rmtree(src, ignore_errors=True)
    return sorted(out.glob("*.whl"))[0]


def keep_build() -> bool:
    return os.environ.get("INFOKV_KEEP_BUILD") == "1"


def install_patched() -> None:
    key = build_key(True)
    stamp = Path(sys.prefix) / "infokv-llama.key"
    if stamp.exists() and stamp.read_text().strip() == key:
        print(f"patched llama-cpp-python already installed ({key})")
        return
    wheel = build_wheel(True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--force-reinstall", "--no-deps", str(wheel)],
                   check=True)
    # runtime dependencies of llama-cpp-python itself
    subprocess.run([sys.executable, "-m", "pip", "install", "typing-extensions>=4.5.0", "numpy>=1.20.0",
                    "diskcache>=5.6.1", "jinja2>=2.11.3"], check=True)
    stamp.write_text(key + "\n")
    print(f"installed patched llama-cpp-python ({key})")


def stock_lib_dir() -> Path:
    """Unpack the stock wheel's shared libraries (for LLAMA_CPP_LIB_PATH) and return their folder."""
    key = build_key(False)
    dest = cache_dir() / "stock-lib" / key
    if not (dest / "llama_cpp" / "lib").is_dir():
        wheel = build_wheel(False)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n.startswith("llama_cpp/lib/")])
        for so in (tmp / "llama_cpp" / "lib").iterdir():
            so.chmod(0o755)
        tmp.rename(dest)
    return dest / "llama_cpp" / "lib"

"""The GPU check: the patched llama.cpp built for one card, its statistics against the CPU's, speed against stock.

For a GPU machine lent for a few minutes, with no network, that receives at most 64 MiB of files. Two steps:

    python native/gpu_check.py pack                      # here, with network: writes .gpu/ (about 15 MiB)
    python3 native/gpu_check.py run --out DIR            # there, from the repository's root, .gpu/ carried

``pack`` writes into ``.gpu/`` (ignored by git): the llama-cpp-python source distribution trimmed to what the
build reads (no models, documentation, tests, examples, tools but mtmd, or GPU backends but CUDA), the wheels
the machine lacks (cffi, pycparser, diskcache, gguf; for its Python, 3.12 unless ``--python-version``), and the
skeleton of SmolLM2-135M (its keys and vocabulary, no weights: :mod:`random_model`).

``run`` builds the patched library for the card's architecture only (``nvidia-smi``'s compute capability),
installs it with the native kernels into the running interpreter's environment, builds stock ``libllama``
from the same source without the patches against the same ggml libraries (ggml is not patched; one CUDA
build serves both), writes a random-weight SmolLM2 at the real shapes, then runs:

- the signal tests (``tests/test_signals*.py``, ``tests/test_keys.py``) with every layer on the GPU, and
  ``tests/test_signals_gpu.py``: the statistics of the same tokens on the GPU against the CPU's;
- ``bench speed --quick`` with every layer on the GPU, against stock llama.cpp with flash attention on;
- ``bench sequences --sequences 1,8`` on the GPU.

It writes ``DIR/gpu-check.json`` (the device, each step's seconds and output, the tests' summary and the two
benchmarks' figures) and the benchmarks' own JSON files beside it. ``--cpu`` runs the same steps without CUDA
(to check the script on a machine without a GPU): on this project's 2-core machine, beside other jobs, it
took 34 minutes (the build 8, stock libllama 2, the tests 2, the benchmarks 21). How long a CUDA build for one
architecture and the GPU's benchmarks take on a 16-core GPU machine is not measured yet: the benchmarks there
are short (the GPU decodes SmolLM2 far faster than 2 cores), the CUDA build is the unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu"
WHEELS = ("cffi==2.0.0", "pycparser==2.23", "diskcache==5.6.3", "gguf==0.19.0")
# what the build does not read: the Python package's own extras and llama.cpp's models, docs and programs
DROP = (".git", ".github", "docs", "tests", "examples", "docker", "scripts", "vendor/llama.cpp/.git",
        "vendor/llama.cpp/.github", "vendor/llama.cpp/ci", "vendor/llama.cpp/tools/mtmd/test-3.mp4",
        "vendor/llama.cpp/models", "vendor/llama.cpp/docs", "vendor/llama.cpp/tests", "vendor/llama.cpp/examples",
        "vendor/llama.cpp/benches", "vendor/llama.cpp/media", "vendor/llama.cpp/gguf-py",
        "vendor/llama.cpp/grammars", "vendor/llama.cpp/prompts", "vendor/llama.cpp/.devops",
        "vendor/llama.cpp/conversion", "vendor/llama.cpp/requirements", "vendor/llama.cpp/pocs")
KEEP_TOOLS = ("mtmd",)  # llama-cpp-python builds libmtmd from tools/mtmd
KEEP_BACKENDS = ("ggml-cpu", "ggml-cuda", "ggml-rpc", "ggml-blas")
SIGNAL_TESTS = ("tests/test_signals.py", "tests/test_signals_flash.py", "tests/test_keys.py",
                "tests/test_signals_gpu.py")
# runs the command line on the embedded model (not there) and the CPU: nothing of the GPU's
CLI_TEST = "tests/test_signals_flash.py::test_command_line_cache_types_and_flash_attention"


def _dropped(name: str) -> bool:
    """Whether a path of the sdist (its top folder removed) stays behind."""
    if any(name == d or name.startswith(d + "/") for d in DROP):
        return True
    parts = name.split("/")
    if parts[:3] == ["vendor", "llama.cpp", "tools"] and len(parts) > 3:
        return parts[3] not in KEEP_TOOLS
    if parts[:4] == ["vendor", "llama.cpp", "ggml", "src"] and len(parts) > 5:  # a backend's folder
        return parts[4].startswith("ggml-") and parts[4] not in KEEP_BACKENDS
    return False


def pack(python_version: str) -> None:
    from infokv_local.install.llama import fetch_sdist
    from infokv_local.models.embedded import default_model_path

    if PACK.exists():
        shutil.rmtree(PACK)
    (PACK / "sdist").mkdir(parents=True)
    sdist = fetch_sdist()
    trimmed = PACK / "sdist" / sdist.name
    kept = 0
    with tarfile.open(sdist) as src, tarfile.open(trimmed, "w:gz", compresslevel=9) as dst:
        for m in src.getmembers():
            inner = m.name.split("/", 1)[1] if "/" in m.name else ""
            if inner and _dropped(inner):
                continue
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
            kept += m.size
    print(f"{trimmed}: {trimmed.stat().st_size / 2**20:.1f} MiB ({kept / 2**20:.0f} MiB unpacked; "
          f"{sdist.stat().st_size / 2**20:.0f} MiB whole)")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp",
                    *(a for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                      for a in ("--platform", p)), "-d", str(PACK / "wheels"), *WHEELS], check=True)
    gguf_wheel = next((PACK / "wheels").glob("gguf-*.whl"))
    subprocess.run([sys.executable, str(ROOT / "native" / "random_model.py"), "skeleton", str(default_model_path()),
                    str(PACK / "smollm2-skeleton.gguf"), "--gguf", str(gguf_wheel)], check=True)
    total = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file())
    print(f"{PACK}: {total / 2**20:.1f} MiB in all. On the GPU machine, from the repository's root, with .gpu "
          f"carried:\n  python3 native/gpu_check.py run --out \"$OUT\"")


class Steps:
    """Each step's command, seconds and output tail, kept for the JSON file."""

    def __init__(self, out: Path) -> None:
        self.out, self.steps, self.t0 = out, [], time.perf_counter()

    def run(self, name: str, cmd: list[str], env: dict[str, str] | None = None, check: bool = True,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        tail = (proc.stdout + proc.stderr)[-4000:]
        self.steps.append({"step": name, "command": cmd, "seconds": round(seconds, 1), "rc": proc.returncode,
                           "output_tail": tail})
        print(tail[-1500:], flush=True)
        self.save()
        if check and proc.returncode != 0:
            raise SystemExit(f"{name} failed (exit {proc.returncode})")
        return proc

    def save(self, **extra: Any) -> None:
        path = self.out / "gpu-check.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        data.update(extra)
        data["steps"] = self.steps
        data["seconds"] = round(time.perf_counter() - self.t0, 1)
        path.write_text(json.dumps(data, indent=1))


def _device() -> tuple[str, str]:
    """The card's name and its compute capability without the dot (``90`` for an H100)."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
    name, cap, memory = (s.strip() for s in out.split(","))
    return f"{name} ({memory})", cap.replace(".", "")


def build_stock_llama(steps: Steps, env: dict[str, str], work: Path, jobs: int) -> Path:
    """Stock ``libllama`` from the unpatched source against the installed (patched build's) ggml libraries,
    in a folder with them, for ``bench speed --stock-lib``. The patches touch no ggml file, so its ggml is
    stock ggml, and the CUDA kernels are compiled once."""
    import llama_cpp  # the patched build just installed

    wheel_lib = Path(llama_cpp.__file__).resolve().parent / "lib"
    prefix = wheel_lib.parent.parent  # site-packages: the wheel installs ggml's CMake package under lib/cmake
    from infokv_local.install.llama import prepare_source

    src = prepare_source(patched=False) / "vendor" / "llama.cpp"  # the sdist in $INFOKV_CACHE, unpatched
    build = work / "stock-build"
    steps.run("configure stock libllama", [
        "cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_USE_SYSTEM_GGML=ON", f"-DCMAKE_PREFIX_PATH={prefix}",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF"], env=env)
    steps.run("build stock libllama", ["cmake", "--build", str(build), "--target", "llama", "-j", str(jobs)], env=env)
    lib = work / "stock-lib"
    shutil.rmtree(lib, ignore_errors=True)
    lib.mkdir()
    for so in [*(build / "bin").glob("libllama.so*"), *wheel_lib.glob("libggml*.so*")]:
        shutil.copy2(so, lib / so.name, follow_symlinks=False)
    return lib


def run(out: Path, cpu: bool, jobs: int, threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(out)
    work = Path(os.environ.get("GPU_CHECK_WORK", "/tmp/infokv-gpu-check"))
    work.mkdir(parents=True, exist_ok=True)
    device, arch = ("CPU (--cpu)", "") if cpu else _device()
    steps.save(device=device, date=time.strftime("%Y-%m-%d %H:%M"), cpu_only=cpu)
    py = sys.executable
    if not cpu:  # --cpu runs where they are installed already (and this Python may not be theirs)
        steps.run("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             *map(str, sorted((PACK / "wheels").glob("*.whl")))])
    cache = work / "cache"
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    for s in (PACK / "sdist").glob("*.tar.gz"):
        shutil.copy2(s, cache / "sdist" / s.name)
    # no network there: pip builds with the installed scikit-build-core (pip reads this variable inverted)
    # and never looks for packages; everything the steps need is installed or carried
    env = {**os.environ, "INFOKV_CACHE": str(cache), "CMAKE_BUILD_PARALLEL_LEVEL": str(jobs),
           "PIP_NO_BUILD_ISOLATION": "0", "PIP_NO_INDEX": "1", "INFOKV_KEEP_BUILD": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if not cpu:
        env["CMAKE_ARGS"] = f"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES={arch}"
    steps.run("build and install the patched library and kernels", [py, "-m", "infokv_local", "install"], env=env)
    # in a new process: this one has not imported the new build
    steps.run("stock libllama (configure, build)", [py, str(ROOT / "native" / "gpu_check.py"), "stock",
                                                   "--work", str(work), "--jobs", str(jobs)], env=env)
    stock_lib = work / "stock-lib"
    model = work / "smollm2-random.gguf"
    steps.run("random-weight SmolLM2", [py, str(ROOT / "native" / "random_model.py"), "fill",
                                        str(PACK / "smollm2-skeleton.gguf"), str(model)], env=env)
    layers = "0" if cpu else "999"
    test_env = {**env, "INFOKV_TEST_MODEL": str(model), "INFOKV_TEST_GPU_LAYERS": layers}
    tests = steps.run("signal tests on the device", [
        py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SIGNAL_TESTS,
        "--deselect", CLI_TEST], env=test_env, check=False)
    summary = (tests.stdout.strip().splitlines() or [""])[-1]
    steps.save(tests={"rc": tests.returncode, "summary": summary})
    speed_json, seq_json = out / "bench-speed-gpu.json", out / "bench-sequences-gpu.json"
    steps.run("bench speed --quick", [py, "-m", "infokv_local", "bench", "speed", "--quick", "--model", str(model),
                                      "--gpu-layers", layers, "--threads", str(threads), "--stock-flash-attn", "on",
                                      "--stock-lib", str(stock_lib), "--out", str(speed_json)], env=env, check=False)
    steps.run("bench sequences 1,8", [py, "-m", "infokv_local", "bench", "sequences", "--model", str(model),
                                      "--gpu-layers", layers, "--threads", str(threads), "--sequences", "1,8",
                                      "--cached", "256", "--rounds", "1", "--json", str(seq_json)], env=env,
              check=False)
    figures = {}
    for key, path in (("speed", speed_json), ("sequences", seq_json)):
        if path.exists():
            data = json.loads(path.read_text())
            figures[key] = data.get("rows", data)
    steps.save(figures=figures)
    print(f"wrote {out / 'gpu-check.json'}: tests {summary!r}; {time.perf_counter() - steps.t0:.0f} s in all")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    p = sub.add_parser("pack", help="write .gpu/ (here, with network)")
    p.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    r = sub.add_parser("run", help="build, test and measure (on the GPU machine)")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    r.add_argument("--cpu", action="store_true", help="no CUDA: the same steps on the CPU, to check this script")
    r.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs (default: every core)")
    r.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2), help="CPU threads of the benchmarks")
    s = sub.add_parser("stock", help="(a step of run) stock libllama against the installed ggml")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    if args.step == "pack":
        pack(args.python_version)
    elif args.step == "run":
        run(args.out, args.cpu, args.jobs, args.threads)
    else:
        print(build_stock_llama(Steps(args.work), dict(os.environ), args.work, args.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Thread defaults: physical cores the process may use, as llama.cpp's own tools choose."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from infokv_local.api import InfoKVLlama
from infokv_local.llamacpp import threads


def test_default_is_within_the_allowed_cpus() -> None:
    n = threads.default_threads()
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= n <= allowed


def test_siblings_count_once_and_a_quota_caps(tmp_path, monkeypatch) -> None:
    # four logical CPUs on two cores (hyper-threads share a siblings list), under a 1.5-CPU cgroup quota
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(threads, "_SYS_CPU", tmp_path)
    monkeypatch.setattr(threads, "_allowed_cpus", lambda: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "_CGROUP_CPU_MAX", quota)
    threads.default_threads.cache_clear()
    try:
        assert threads.default_threads() == 2
        quota.write_text("150000 100000\n")
        threads.default_threads.cache_clear()
        assert threads.default_threads() == 2
        quota.write_text("50000 100000\n")
        threads.default_threads.cache_clear()
        assert threads.default_threads() == 1
        quota.write_text("max 100000\n")
        threads.default_threads.cache_clear()
        assert threads.default_threads() == 2
    finally:
        threads.default_threads.cache_clear()


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_thread_counts_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="n_threads"):
        threads.resolve_threads(bad)


def test_the_chosen_count_is_in_kv_stats(model) -> None:
    with InfoKVLlama(model, budget=64, buffer=16) as llm:
        assert llm.kv_stats()["n_threads"] == threads.default_threads()
    with InfoKVLlama(model, budget=64, buffer=16, n_threads=1) as llm:
        assert llm.kv_stats()["n_threads"] == 1


def test_openmp_keeps_its_unthrottled_wait_unless_the_environment_says_otherwise():
    """OpenMP teams of several calling threads must not make libgomp's workers sleep after every graph
    (infokv_local/llamacpp/openmp.py); a user's own setting wins."""
    from infokv_local.llamacpp import openmp

    env: dict[str, str] = {}
    assert openmp.configure(env) and env == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}
    for own in ({"OMP_WAIT_POLICY": "PASSIVE"}, {"GOMP_SPINCOUNT": "0"}):
        env = dict(own)
        assert not openmp.configure(env) and env == own
    clean = {k: v for k, v in os.environ.items() if k not in openmp.WAIT}
    code = ("import os, infokv_local.llamacpp.context; "
            "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["ACTIVE", "300000"], out.stderr

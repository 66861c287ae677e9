"""The native build's choices that depend on the machine: AMX left out where ggml's AMX kernels crash, and
wheels keyed by the CPU they were built for."""

from __future__ import annotations

from pathlib import Path

import pytest

from infokv_local.install import llama as install_llama


@pytest.fixture()
def build_llama():
    return install_llama


def test_amx_is_left_out_only_on_x86_cpus_that_have_it(build_llama, monkeypatch):
    monkeypatch.setattr(build_llama.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build_llama, "cpu_flags", lambda: {"avx2", "avx512f", "amx_tile", "amx_int8"})
    assert build_llama.native_compiler_flags() == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    monkeypatch.setattr(build_llama, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert build_llama.native_compiler_flags() == []
    monkeypatch.setattr(build_llama.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(build_llama, "cpu_flags", lambda: {"amx_tile"})
    assert build_llama.native_compiler_flags() == []


def test_wheels_are_keyed_by_the_cpu(build_llama, monkeypatch):
    monkeypatch.setattr(build_llama.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build_llama, "cpu_flags", lambda: {"avx2"})
    a = build_llama.build_key(True)
    assert a == build_llama.build_key(True)
    monkeypatch.setattr(build_llama, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert build_llama.build_key(True) != a
    assert build_llama.build_key(False) != build_llama.build_key(True)


def test_cpu_flags_reads_this_machine():
    mod = install_llama
    flags = mod.cpu_flags()
    if Path("/proc/cpuinfo").exists() and mod.platform.machine() == "x86_64":
        assert "sse2" in flags

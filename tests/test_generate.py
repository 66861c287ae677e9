"""The demo generation (README's first command) end to end on the real model."""

from __future__ import annotations

import subprocess
import sys

from infokv_local.engine import Engine
from infokv_local.generate import GenerationStats, chat_prompt, generate


def test_chat_prompt_uses_the_gguf_template(model):
    prompt = chat_prompt(model, "Hello!", system="Be brief.")
    assert "<|im_start|>user\nHello!<|im_end|>" in prompt  # SmolLM2's ChatML template from the metadata
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt


def test_greedy_generation_is_deterministic_and_within_budget(model):
    prompt = chat_prompt(model, "Write a long story about a lighthouse keeper.")
    runs = []
    for _ in range(2):
        with Engine(model, "infokv", budget=64, buffer=16, n_recent=16, check_invariants=True) as eng:
            st = GenerationStats()
            runs.append("".join(generate(eng, prompt, max_tokens=120, stats=st)))
    assert runs[0] == runs[1] and runs[0].strip()
    assert st.completion_tokens <= 120
    assert st.max_used_cells <= 64 + 16
    if st.prompt_tokens + st.completion_tokens > 80:
        assert st.evictions >= 1


def test_cli_generate():
    res = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "Say hello.", "--max-tokens", "8",
                          "--budget", "64", "--buffer", "16", "--policy", "snapkv"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "KV cells used" in res.stderr and "snapkv, budget 64 + buffer 16" in res.stderr


def test_cli_missing_model_is_a_clear_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "hi", "--model", str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Model file not found" in res.stderr


def test_cli_models_lists_the_default_and_the_benchmark_models(model_path):
    res = subprocess.run([sys.executable, "-m", "infokv_local", "models"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert str(model_path) in res.stdout
    assert "qwen2.5-coder-1.5b" in res.stdout and "qwen2.5-coder-0.5b" in res.stdout


def test_cli_unknown_registry_model_is_a_clear_error():
    res = subprocess.run([sys.executable, "-m", "infokv_local", "models", "--fetch", "llama-70b"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown model" in res.stderr

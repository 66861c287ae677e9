"""The demo generation (README's first command) end to end on the real model."""

from __future__ import annotations

import subprocess
import sys

from infokv_local.generate import GenerationStats, chat_prompt, generate


def test_chat_prompt_uses_the_gguf_template(model):
    prompt = chat_prompt(model, "Hello!", system="Be brief.")
    assert "<|im_start|>user\nHello!<|im_end|>" in prompt  # SmolLM2's ChatML template from the metadata
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt


def test_greedy_generation_is_deterministic(model):
    prompt = chat_prompt(model, "Name three colours.")
    stats = GenerationStats(0, 0, 0, 0.0, 0.0, 0.0)
    a = "".join(generate(model, prompt, max_tokens=12, stats=stats))
    b = "".join(generate(model, prompt, max_tokens=12))
    assert a == b and a.strip()
    assert stats.completion_tokens <= 12
    assert stats.used_cells == stats.prompt_tokens + stats.completion_tokens - (stats.completion_tokens == 12)
    assert 0 < stats.mean_entropy < 12


def test_cli_generate():
    res = subprocess.run([sys.executable, "-m", "infokv_local", "generate", "Say hello.", "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    assert "KV cells used" in res.stderr


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

"""One set of defaults on every surface, the command line's shape (subcommand functions, bench
subparsers, errors with and without --verbose), and the UI's optional dependency."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from infokv_local import InfoKVLlama
from infokv_local.__main__ import build_parser
from infokv_local.cli.options import settings_from_args
from infokv_local.settings import DEFAULTS, Settings

CLI = [sys.executable, "-m", "infokv_local"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_the_probe_help_names_every_policy_that_reads_the_observation_window():
    from infokv_local.cli.options import PROBE_POLICIES
    from infokv_local.policies import ATTENTION, ATTENTION_ALL_ROWS, POLICIES

    window = {n for n, cls in POLICIES.items() if ATTENTION in cls.needs and ATTENTION_ALL_ROWS not in cls.needs}
    assert set(PROBE_POLICIES.split(", ")) == window


def test_every_surface_reads_the_one_set_of_defaults():
    sig = inspect.signature(InfoKVLlama.__init__).parameters
    for name, value in DEFAULTS.as_kwargs().items():
        assert sig[name].default == value, name
    ap = build_parser()
    for command in ("generate x", "chat", "batch --input a --output b"):
        args = ap.parse_args(command.split())
        assert settings_from_args(args) == DEFAULTS, command
    from infokv_local.ui.session import Settings as UISettings

    ui = UISettings()
    assert (ui.policy, ui.budget, ui.buffer, ui.n_sink, ui.n_recent) == \
        (DEFAULTS.policy, DEFAULTS.budget, DEFAULTS.buffer, DEFAULTS.n_sink, DEFAULTS.n_recent)
    tp = ap.parse_args(["bench", "throughput"])
    assert (tp.budget, tp.buffer) == (DEFAULTS.budget, DEFAULTS.buffer)
    assert DEFAULTS.with_(budget=100, buffer=None) == Settings(budget=100)


def test_subcommands_are_functions_and_bench_has_real_subparsers():
    ap = build_parser()
    for argv in (["generate", "x"], ["chat"], ["models"], ["bench", "table", "a.json"],
                 ["bench", "docs", "--out", "d.jsonl"], ["bench", "fidelity", "--docs", "d", "--ratio", "0.25"],
                 ["bench", "overhead", "--rounds", "1"], ["bench", "throughput", "--rounds", "1"]):
        assert callable(ap.parse_args(argv).func), argv
    assert ap.parse_args(["bench", "overhead", "--rounds", "1"]).rounds == 1
    for args in (["bench", "overhead"], ["bench", "throughput"]):
        res = run(*args, "--help")
        assert res.returncode == 0 and "example" in res.stdout and "--rounds" in res.stdout, res.stdout
    res = run("bench", "throughput", "--no-such-option")
    assert res.returncode == 2 and "unrecognized arguments: --no-such-option" in res.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_errors_are_one_line_without_verbose_and_a_traceback_with_it(where):
    res = run("generate", "hi", "--budget", "20")
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: a budget of 20")
    assert "Traceback" not in res.stderr
    args = ["--verbose", "generate", "hi", "--budget", "20"] if where == "before" else \
        ["generate", "hi", "--budget", "20", "--verbose"]
    res = run(*args)
    assert res.returncode == 2 and "Traceback" in res.stderr and "error: a budget of 20" in res.stderr


def test_ui_without_gradio_says_how_to_install_it():
    code = ("import sys; sys.modules['gradio'] = None\n"  # what an environment without Gradio gives
            "from infokv_local.ui.__main__ import main\nsys.exit(main([]))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "pip install 'infokv-local[ui]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr

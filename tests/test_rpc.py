"""llama.cpp's RPC backend on loopback: ``rpc-server`` from this package, a model whose every layer lives
there, and the same text, the same evictions and the same scores as a local run. Bad endpoints are clear
errors and never end the process (llama.cpp itself aborts on a failed connection)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from infokv_local.errors import RpcError
from infokv_local.llamacpp.model import Model
from infokv_local.llamacpp.rpc import parse_endpoints

CLI = [sys.executable, "-m", "infokv_local"]

# run in a child process: registering RPC devices is for the life of a process
PROBE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from infokv_local import InfoKVLlama
    from infokv_local.llamacpp.model import Model
    rpc = sys.argv[2] or ()
    # the RPC server keeps the weights as the file has them: so does the local reference (no CPU repacking)
    model = Model(sys.argv[1], rpc=rpc, repack=False)
    with InfoKVLlama(model, budget=48, buffer=16, n_recent=8, flash_attn=False, n_threads=1) as llm:
        out = llm.create_completion("The old lighthouse keeper climbed the stairs and", max_tokens=60,
                                    temperature=0)
        cm = llm.cache_map()
        dev = [llm.model.meta("general.name")]
        print(json.dumps({"text": out["choices"][0]["text"], "kv": out["usage"]["kv"],
                          "in_cache": cm.in_cache.tolist(), "score": np.nan_to_num(cm.score, nan=-1).tolist()}))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the RPC server did not start listening")


@pytest.fixture(scope="module")
def rpc_server() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([*CLI, "rpc-server", "--port", str(port), "--threads", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(port, proc)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _probe(model_path, rpc: str) -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, str(model_path), rpc], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_endpoints_are_parsed_or_refused_clearly():
    assert parse_endpoints("127.0.0.1:50052, host-b:1") == ("127.0.0.1:50052", "host-b:1")
    assert parse_endpoints(["a:1,b:2", "a:1"]) == ("a:1", "b:2")
    assert parse_endpoints("[::1]:50052") == ("::1:50052",)
    assert parse_endpoints(None) == () and parse_endpoints("") == ()
    for bad in ("localhost", "host:", ":50052", "host:port", "host:0", "host:70000"):
        with pytest.raises(RpcError, match="HOST:PORT"):
            parse_endpoints(bad)


def test_an_unreachable_or_foreign_server_is_a_clear_error(model_path):
    port = _free_port()
    with pytest.raises(RpcError, match="cannot reach the RPC server"):
        Model(model_path, rpc=f"127.0.0.1:{port}")
    # something that listens but is not llama.cpp's RPC server: llama.cpp would abort, we refuse in time
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]

        def answer_nonsense() -> None:
            for _ in range(2):
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_nonsense, daemon=True)
        t.start()
        with pytest.raises(RpcError, match="does not answer as a llama.cpp RPC server"):
            Model(model_path, rpc=f"127.0.0.1:{port}")
    r = subprocess.run([*CLI, "generate", "Hi", "--rpc", "nonsense"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: RPC server 'nonsense' is not HOST:PORT" in r.stderr, r.stderr


@pytest.mark.parametrize("which", ["model_path", "gemma_path"])
def test_layers_on_a_loopback_rpc_server_give_the_local_run(which, request, rpc_server):
    """Every layer on the RPC server: the same greedy text, the same tokens evicted, the same scores (the
    attention and layer statistics come back over RPC) as with the layers here; on SmolLM2 (one dense cache)
    and on Gemma 3 (a sliding-window cache beside the growing one, whose cells alone are evicted)."""
    model_path = request.getfixturevalue(which)
    local = _probe(model_path, "")
    remote = _probe(model_path, rpc_server)
    assert remote["kv"]["evictions"] > 0
    assert remote["kv"]["memory"] == local["kv"]["memory"] == ("dense" if which == "model_path" else "sliding-window")
    assert remote["text"] == local["text"]
    assert remote["in_cache"] == local["in_cache"]
    np.testing.assert_allclose(remote["score"], local["score"], rtol=1e-3, atol=1e-5)
    for key in ("used_cells", "max_used_cells", "evicted_tokens", "evictions"):
        assert remote["kv"][key] == local["kv"][key], key


def test_generate_with_rpc_on_the_command_line(model_path, rpc_server):
    args = ["generate", "Name three colours.", "--max-tokens", "24", "--budget", "48", "--buffer", "16",
            "--threads", "1", "--flash-attn", "off", "--json"]
    local = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    remote = subprocess.run([*CLI, *args, "--rpc", rpc_server], capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["text"] == json.loads(local.stdout)["text"]

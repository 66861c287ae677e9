"""llama.cpp's RPC backend: a model's layers on ``rpc-server`` processes, here or on other machines.

The client side registers each server's devices with llama.cpp (as ``--rpc`` does in llama.cpp's own
tools), after which offloaded layers (``n_gpu_layers``) are spread over them. The server side is
:func:`serve`, the library's own RPC server loop, so ``python -m infokv_local rpc-server`` needs no
separate llama.cpp build.

llama.cpp aborts the whole process when it cannot connect to a server or the handshake fails, so
every endpoint is first tried from a short-lived child process; only endpoints that answered there
are handed to llama.cpp here. A server that dies in the middle of a run still ends the client
(llama.cpp's RPC client has no recovery): RPC is for trusted machines on one network, never the
open internet (the protocol has no authentication).
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading

from ..errors import RpcError
from . import library as native

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
_registered: set[str] = set()
_lock = threading.Lock()


def parse_endpoints(spec: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """``"host:port,host:port"`` (or a list of them) as normalised endpoints; clear errors on bad ones."""
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    out: list[str] = []
    for raw in items:
        item = raw.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise RpcError(f"RPC server {item!r} is not HOST:PORT (for example 127.0.0.1:{DEFAULT_PORT})")
        host = host.strip("[]")
        out.append(f"{host}:{int(port)}")
    return tuple(dict.fromkeys(out))


def _lib() -> ctypes.CDLL:
    native.require_patched()
    lib = native.lib
    lib.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    lib.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_register.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_register.restype = None
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_dev_count.argtypes = []
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    return lib


def _proc(name: str) -> int:
    lib = _lib()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RpcError("this llama.cpp build has no RPC backend: rebuild it with `make setup` "
                       "(python -m infokv_local install builds it with -DGGML_RPC=ON)")
    fn = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not fn:
        raise RpcError(f"the RPC backend of this llama.cpp build lacks {name}")
    return int(fn)


def _probe_reachable(endpoint: str, timeout: float) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RpcError(f"cannot reach the RPC server at {endpoint}: {e.strerror or e}. Start one there with "
                       f"`python -m infokv_local rpc-server --host HOST --port PORT` (or llama.cpp's rpc-server)"
                       ) from None


def _probe_handshake(endpoint: str, timeout: float) -> int:
    """The server's device count, asked from a child process (llama.cpp aborts on a failed handshake)."""
    code = ("import sys; from infokv_local.llamacpp import rpc as r; "
            "print(r._device_count_here(sys.argv[1]))")
    try:
        r = subprocess.run([sys.executable, "-c", code, endpoint], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "INFOKV_VERBOSE": "0"})
    except subprocess.TimeoutExpired:
        raise RpcError(f"the RPC server at {endpoint} did not answer within {timeout:.0f} s") from None
    last = r.stdout.strip().splitlines()[-1:] if r.stdout.strip() else []
    if r.returncode != 0 or not last or not last[0].isdigit():
        why = (r.stderr.strip().splitlines() or ["no answer"])[-1]
        raise RpcError(f"{endpoint} does not answer as a llama.cpp RPC server of this protocol version ({why})")
    return int(last[0])


def _device_count_here(endpoint: str) -> int:
    add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_proc("ggml_backend_rpc_add_server"))
    reg = add(endpoint.encode())
    return int(_lib().ggml_backend_reg_dev_count(reg)) if reg else 0


def connect(endpoints: tuple[str, ...], timeout: float = 30.0) -> None:
    """Register the devices of each RPC server with llama.cpp (once per process and endpoint), so that
    models loaded afterwards with ``n_gpu_layers > 0`` place layers on them."""
    with _lock:
        for endpoint in endpoints:
            if endpoint in _registered:
                continue
            _probe_reachable(endpoint, timeout=min(timeout, 10.0))
            if _probe_handshake(endpoint, timeout) == 0:
                raise RpcError(f"the RPC server at {endpoint} offers no device")
            add = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(_proc("ggml_backend_rpc_add_server"))
            reg = add(endpoint.encode())
            if not reg:
                raise RpcError(f"the RPC server at {endpoint} offers no device")
            _lib().ggml_backend_register(reg)
            _registered.add(endpoint)


_DEVICE_TYPE_CPU, _DEVICE_TYPE_ACCEL = 0, 3  # enum ggml_backend_dev_type


def serve(host: str, port: int, threads: int, cache_dir: str | None = None) -> None:
    """Run llama.cpp's RPC server on ``host:port`` with this machine's accelerators (or its CPU when it has
    none), as llama.cpp's ``rpc-server`` does. Blocks; the loop runs in a thread so Ctrl-C ends it."""
    lib = _lib()
    devices = [lib.ggml_backend_dev_get(i) for i in range(lib.ggml_backend_dev_count())]
    chosen = [d for d in devices if lib.ggml_backend_dev_type(d) not in (_DEVICE_TYPE_CPU, _DEVICE_TYPE_ACCEL)]
    if not chosen:
        cpu = lib.ggml_backend_dev_by_type(_DEVICE_TYPE_CPU)
        chosen = [cpu] if cpu else []
    if not chosen:
        raise RpcError("no device to serve")
    start = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p))(_proc("ggml_backend_rpc_start_server"))
    array = (ctypes.c_void_p * len(chosen))(*chosen)
    try:  # bind here first: llama.cpp's loop only prints a message when the port is taken
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise RpcError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    endpoint = f"{host}:{port}".encode()
    cache = cache_dir.encode() if cache_dir else None
    loop = threading.Thread(target=start, args=(endpoint, cache, threads, len(chosen), array), daemon=True,
                            name="llama.cpp rpc server")
    loop.start()
    while loop.is_alive():
        loop.join(0.5)
    raise RpcError(f"llama.cpp's RPC server on {host}:{port} stopped (see its messages above)")

"""Run the chat as a subprocess on a free local port and open it in the system's headless Chromium.

Used by the end-to-end test (``tests/test_ui.py``) and by :mod:`.screenshot`. Playwright is only
needed by :func:`launch_chromium` (it is a test extra, not a dependency of the package).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
#: Headless, sandbox-free (containers) and quiet: no background network use of any kind.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class UIServer:
    """``python -m infokv_local.ui <args>`` in a subprocess, its output in ``log_path``."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = Path(log_path)
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "127.0.0.1,localhost",
               "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "infokv_local.ui", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        """What the server printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the page answers; ``RuntimeError`` with the log if the server exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the UI exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"the UI did not answer within {timeout}s:\n{self.log()}")

    def wait_log_count(self, text: str, n: int, timeout: float = 20.0) -> None:
        """Wait until ``text`` occurs ``n`` times in the log; ``TimeoutError`` otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log().count(text) >= n:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} not {n} times in the UI's log within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def launch_chromium(playwright: Any, executable: str = CHROMIUM) -> Any:
    """The system Chromium, headless, through a ``sync_playwright()`` handle."""
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)

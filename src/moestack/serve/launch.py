"""`moestack serve` as a child process on 127.0.0.1: start it, wait until it answers, stop it.

For tests, benches and notebooks that want a live server to point a client at (vLLM's tests keep the
same helper, `RemoteOpenAIServer`). Only the standard library: the caller brings its own client.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`moestack serve --model MODEL ARGS...` on a free port of 127.0.0.1 (a context manager; nproc > 1 runs it
    under torchrun with that many ranks).

    `url` is the server's root, `base_url` its OpenAI root (`.../v1`); `health()` reads GET /health;
    `stop(sig)` sends `sig` and returns the exit status; `log()` is what the process printed."""

    def __init__(self, model: str, *args: str, timeout: float = 300, env: dict | None = None, nproc: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        self._log = tempfile.TemporaryFile(mode="w+")
        # nproc > 1: under torchrun (expert-parallel serving: rank 0 serves HTTP, serve/ep_server.py)
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
        cmd = [sys.executable, *launcher, "-m", "moestack.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moestack serve exited with {self.proc.returncode} before it served:\n{self.log()}")
            try:
                self.health()
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise TimeoutError(f"moestack serve did not answer on {self.url} within {timeout:.0f} s:\n{self.log()}")

    def health(self) -> dict:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:  # 503 when the engine thread is dead: still a JSON body
            return json.loads(err.read())

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self._log.close()

"""Start and stop a plain `sglang serve` process (used by `step35 demo`, tests and benchmarks).

Nothing here configures SGLang: the server is the user's exact command line; our plugin is picked
up through its entry point like in any deployment.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import requests


# Ports handed to a server that binds them later come from below the kernel's ephemeral range
# (bind(0) and outgoing connections only get ports from there up) and below SGLang's own 22000-29999
# (its dist-init ports): a CPU server may take minutes to bind, and a bind(0) port could be taken by
# another connection (a second test worker's server, a client) in between ("address already in use").
_PORT_RANGE = (12000, 21999)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that nothing else on the host is handed in the meantime."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = _PORT_RANGE[0], min(_PORT_RANGE[1], ephemeral_low - 1)
    for port in random.sample(range(low, high + 1), min(64, max(0, high - low + 1))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no such range on this host: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sglang_executable() -> str:
    """The `sglang` console script of this interpreter's environment."""
    exe = Path(sys.executable).parent / "sglang"
    return str(exe) if exe.exists() else "sglang"


class SGLangServer:
    """`sglang serve --model-path ... <extra args>` on 127.0.0.1, as a context manager."""

    def __init__(
        self,
        model_path: str,
        extra_args: Sequence[str] = (),
        env: Optional[dict] = None,
        port: Optional[int] = None,
        startup_timeout: float = 300.0,
    ):
        self.model_path = str(model_path)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix="sglang-step35-server-", suffix=".log")[1])
        self.proc: Optional[subprocess.Popen] = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sglang_executable(), "serve", "--model-path", self.model_path,
            "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args,
        ]

    def start(self) -> "SGLangServer":
        log = open(self.log_path, "w")
        # Own process group: stopping the server must also stop its scheduler/detokenizer children.
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        deadline = time.time() + self.startup_timeout
        try:
            while time.time() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sglang serve exited with code {self.proc.returncode} during start-up; "
                                       f"log tail:\n{self.log_tail()}")
                try:
                    if requests.get(self.base_url + "/health", timeout=2).status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(1.0)
        except BaseException:
            # Ctrl-C, a test timeout or a failed start: no caller holds the server yet to stop it,
            # and its own process group would outlive us.
            self.stop()
            raise
        self.stop()
        raise TimeoutError(f"sglang serve not healthy after {self.startup_timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """Ctrl-C the process group (SIGINT), then SIGKILL what is left; returns the server's exit code.

        Not SIGTERM: SGLang 0.5.23 drains on SIGTERM through a loop that looks every 5 s
        (TokenizerManager.sigterm_watchdog), and a SIGTERM to the group ends the detokenizer first,
        which sends the server down its crash path (SIGQUIT, 5 more seconds of "crash diagnostics"):
        6 s per stop, measured. On SIGINT the HTTP server stops at once (~1.7 s); the scheduler,
        which keeps running, goes with the group's SIGKILL."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group
        except ProcessLookupError:
            pass
        self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "SGLangServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServerUnavailable(RuntimeError):
    """A :class:`ServerPool` key whose server failed to start earlier (not retried)."""


class ServerPool:
    """`sglang serve` processes by key, one at a time: asking for another key stops the current
    server first (a laptop or CPU CI never runs two at once). A key whose server failed to start is
    not retried; asking for it again raises :class:`ServerUnavailable` with the first error.

    ``configs``: key -> (model path, or a callable giving it on first use; extra args; env or None).
    ``starts`` records each start: seconds, command, env, and the log lines about CUDA graphs."""

    def __init__(self, configs: dict[str, tuple[Union[str, Path, Callable[[], Union[str, Path]]], Sequence[str],
                                                Optional[dict]]]):
        self.configs = configs
        self.key: Optional[str] = None
        self.server: Optional[SGLangServer] = None
        self.failed: dict[str, str] = {}
        self.starts: dict[str, dict] = {}

    def get(self, key: str, deadline: Optional[float] = None) -> SGLangServer:
        """The server of ``key`` (started if needed); ``deadline`` (time.time()) bounds its start-up."""
        if key in self.failed:
            raise ServerUnavailable(f"server {key} did not start: {self.failed[key]}")
        if key == self.key:
            return self.server
        self.close()
        model, args, env = self.configs[key]
        model = model() if callable(model) else model
        kw = {} if deadline is None else {"startup_timeout": max(5.0, deadline - time.time())}
        server = SGLangServer(str(model), list(args), env=env, **kw)
        t0 = time.perf_counter()
        try:
            server.start()
        except BaseException as e:
            server.stop()
            self.failed[key] = f"{type(e).__name__}: {str(e)[-1500:]}"
            raise
        self.starts[key] = {
            "seconds": round(time.perf_counter() - t0, 1),
            "command": shlex.join(server.command()[1:]),
            "env": env,
            "cuda_graph_log": [ln.strip()[-200:] for ln in server.log_text().splitlines() if "cuda graph" in ln.lower()][-4:],
        }
        self.key, self.server = key, server
        return server

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        self.key, self.server = None, None

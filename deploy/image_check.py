"""`make image-check`: the production image, built from the real Dockerfile and tried.

It builds the Dockerfile with podman, then from the image runs `preorder migrate`, `preorder token` and
`preorder serve --workers 2` against an embedded PostgreSQL and Redis of its own, creates a product and an
order through the served API, runs the image's HEALTHCHECK, and checks that `podman-compose config` parses
docker-compose.yml. Every container and server it starts is removed at the end, also on failure.

What this kind of machine needs (found by trying; see README "Containers"):
- podman with runc (crun fails: "cgroups in hybrid mode not supported"), installed with apt-get if missing;
- explicit ulimits in a containers.conf named by CONTAINERS_CONF (root cannot raise its limits here);
- no image registry: when `python:3.11-slim` is not in local storage, a stand-in is made from Debian's own
  Python 3.11 (debootstrap minbase + python3, pip, python-is-python3) and tagged `python:3.11-slim`;
- HTTPS goes through the machine's certificate authority: the host's /etc/ssl/certs is mounted read-only
  into the build's RUN steps (never baked into the image), and uv is told to trust it by a uv.toml mounted
  the same way;
- `--network host`, so the container reaches the servers on 127.0.0.1 (PostgreSQL through its unix socket,
  mounted into the container), and `--format docker`, which keeps the HEALTHCHECK.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from preorder.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "localhost/preorder:image-check"
BASE = "python:3.11-slim"
TOOLS = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap"}  # command -> Debian package
STAND_IN_PACKAGES = "python3,python3-pip,python-is-python3"
CA_CERTS = Path("/etc/ssl/certs")
SERVE_WITHIN_S = 60
WORKERS = 2  # as the image's CMD runs it


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python deploy/image_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep-image", action="store_true", help=f"keep {IMAGE} afterwards (the base is always kept)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a plain kill also unwinds through the cleanup
    say = Progress()
    ensure_tools(say)
    with tempfile.TemporaryDirectory(prefix="preorder-image-") as tmp, contextlib.ExitStack() as cleanup:
        podman = Podman(Path(tmp), say)
        ensure_base(podman, Path(tmp))
        podman.build()
        if not args.keep_image:
            cleanup.callback(podman.quiet, "rmi", "-f", IMAGE)
        servers = Servers.start(Path(tmp), cleanup)
        say(f"embedded PostgreSQL and Redis up ({servers.redis_url})")
        try_image(podman, servers, cleanup)
        check_compose(say)
    say("image check passed")
    return 0


class Progress:
    """One line per step with the seconds since the start, so the log says where the time went."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {message}", flush=True)


def ensure_tools(say: Progress) -> None:
    """podman, runc and debootstrap from Debian's packages; CI runs as root on a machine that may be fresh."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {', '.join(missing)}: install them (apt-get install -y {' '.join(missing)})")
    say(f"installing {', '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], env=env, check=True, stdout=subprocess.DEVNULL)


class Podman:
    """podman with this machine's needs: runc, explicit ulimits (containers.conf), the host's CA for builds."""

    def __init__(self, folder: Path, say: Progress) -> None:
        self.say = say
        conf = folder / "containers.conf"
        _, nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        conf.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc=32768:32768"]\n'
                        '[engine]\nruntime = "runc"\n')
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.uv_conf = folder / "uv"  # mounted at /etc/uv during the build: uv trusts the system's CAs
        self.uv_conf.mkdir()
        (self.uv_conf / "uv.toml").write_text("system-certs = true\n")

    def __call__(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        kw.setdefault("check", True)
        return subprocess.run(["podman", *args], env=self.env, text=True, cwd=ROOT, **kw)

    def quiet(self, *args: str) -> None:
        """For cleanup: never raises; says only that it ran (and when, since removing can take a while)."""
        self(*args, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.say(f"cleanup: podman {' '.join(args)}")

    def output(self, *args: str) -> str:
        done = self(*args, capture_output=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args[:8])} ... exited with {done.returncode}:\n{done.stderr}")
        return done.stdout.strip()

    def build(self) -> None:
        self.say(f"building {IMAGE} from Dockerfile")
        mounts = ["--volume", f"{self.uv_conf}:/etc/uv:ro"]
        if CA_CERTS.is_dir():
            mounts += ["--volume", f"{CA_CERTS}:{CA_CERTS}:ro"]
        build = self("build", "--format", "docker", "--network", "host", *mounts, "--tag", IMAGE,
                     "--file", "Dockerfile", ".", check=False, capture_output=True)
        if build.returncode != 0:
            raise RuntimeError(f"podman build failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
        self.say(f"built {IMAGE}: {self.output('image', 'inspect', '--format', '{{.Size}}', IMAGE)} bytes")

    def logs(self, container: str) -> str:
        """What the container printed (uvicorn logs to stderr, which podman logs replays on its own)."""
        return self("logs", container, capture_output=True, check=False).stderr

    def run(self, *args: str, env: dict[str, str], mounts: Sequence[str] = ()) -> str:
        """A one-shot command in the image; its output."""
        return self.output("run", "--rm", "--no-healthcheck", "--network", "host", *_env_flags(env), *mounts,
                           IMAGE, *args)


def _env_flags(env: dict[str, str]) -> list[str]:
    return [flag for name, value in env.items() for flag in ("--env", f"{name}={value}")]


# ---- the base image -------------------------------------------------------------------------------------

def ensure_base(podman: Podman, folder: Path) -> None:
    """The Dockerfile's FROM as it is, or, with no registry in reach, a stand-in under the same name."""
    if podman("image", "exists", BASE, check=False).returncode == 0:
        podman.say(f"base {BASE} found in local storage")
        return
    mirror = debian_mirror()
    podman.say(f"no {BASE} here and no registry: making a stand-in from Debian bookworm ({mirror})")
    rootfs = folder / "rootfs"
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={STAND_IN_PACKAGES}", "bookworm", str(rootfs),
                    mirror], check=True, stdout=subprocess.DEVNULL)
    # python:3.11-slim's pip installs anywhere; Debian's refuses outside a venv (PEP 668) unless this goes.
    (rootfs / "usr/lib/python3.11/EXTERNALLY-MANAGED").unlink(missing_ok=True)
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        shutil.rmtree(rootfs / cache, ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    podman("import", "--change", 'CMD ["python3"]', "-", f"localhost/{BASE}", stdin=tar.stdout,
           stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise RuntimeError("tar of the stand-in root failed")
    podman.say(f"stand-in {BASE} imported")


def debian_mirror() -> str:
    """The Debian mirror apt uses here (deb822 `URIs:` or one-line `deb URI bookworm ...`)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in (p for p in sources if p.is_file()):
        text = path.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            uri = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if uri and re.search(r"^Suites:.*\bbookworm(\s|$)", stanza, re.M) and "/debian" in uri[1]:
                return uri[1]
        line = re.search(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian/?)\s+bookworm\s", text, re.M)
        if line:
            return line[1]
    return "http://deb.debian.org/debian"


# ---- PostgreSQL and Redis -------------------------------------------------------------------------------

class Servers:
    """Embedded PostgreSQL (reached through its unix socket, mounted into containers) and Redis (TCP)."""

    def __init__(self, socket: Path, redis_url: str) -> None:
        self.socket = socket
        self.redis_url = redis_url

    @classmethod
    def start(cls, folder: Path, cleanup: contextlib.ExitStack) -> Servers:
        pg = EmbeddedPostgres(folder / "postgres")
        cleanup.callback(pg.stop)
        pg.start()
        rd = EmbeddedRedis(folder / "redis", persist=False)
        cleanup.callback(rd.stop)
        sockets = [p for p in (folder / "postgres").glob(".s.PGSQL.*") if not p.name.endswith(".lock")]
        return cls(sockets[0], rd.start())

    @property
    def mounts(self) -> list[str]:
        return ["--volume", f"{self.socket}:/run/postgresql/{self.socket.name}"]

    @property
    def database_url(self) -> str:
        """As the container sees it: the socket's port is the number in its name."""
        port = self.socket.name.rsplit(".", 1)[1]
        return f"postgresql://postgres@/postgres?host=/run/postgresql&port={port}"


# ---- the image under test -------------------------------------------------------------------------------

def try_image(podman: Podman, servers: Servers, cleanup: contextlib.ExitStack) -> None:
    env = {"PREORDER_DATABASE_URL": servers.database_url, "PREORDER_REDIS_URL": servers.redis_url,
           "PREORDER_JWT_SECRET": os.urandom(32).hex(), "PREORDER_PORT": str(free_port())}
    print(podman.run("preorder", "migrate", env=env, mounts=servers.mounts))
    admin, customer = (podman.run("preorder", "token", "--sub", sub, "--role", role, env=env)
                       for sub, role in (("image-admin", "admin"), ("U-image", "customer")))
    base = serve(podman, env=env, mounts=servers.mounts, cleanup=cleanup)
    order_through(base, admin=admin, customer=customer)
    podman.say(f"a product and an order created through the image's {WORKERS} workers")


def serve(podman: Podman, *, env: dict[str, str], mounts: Sequence[str], cleanup: contextlib.ExitStack) -> str:
    """`preorder serve` from the image, every worker started and the HEALTHCHECK passing; its base URL."""
    name = f"preorder-image-check-{os.getpid()}"
    cleanup.callback(podman.quiet, "rm", "--force", "--time", "10", name)
    # The image's own CMD but on 127.0.0.1: with host networking, 0.0.0.0 would open the port to the network.
    # No healthcheck timer (it needs systemd); the HEALTHCHECK itself is run once below.
    podman("run", "--detach", "--name", name, "--network", "host", "--health-interval", "disable",
           *_env_flags(env), *mounts, IMAGE, "preorder", "serve", "--host", "127.0.0.1", "--workers", str(WORKERS),
           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{env['PREORDER_PORT']}"
    wait_serving(base, podman=podman, container=name)
    podman.say(f"preorder serve answers /healthz at {base}, all {WORKERS} workers started")
    podman("healthcheck", "run", name, stdout=subprocess.DEVNULL)
    podman.say("the image's HEALTHCHECK passes")
    return base


def wait_serving(base: str, *, podman: Podman, container: str) -> None:
    """Until /healthz answers and the log shows every worker started (one answering says nothing of the others)."""
    deadline = time.monotonic() + SERVE_WITHIN_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            healthy = httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            if healthy and podman.logs(container).count("Application startup complete") >= WORKERS:
                return
        if podman.output("inspect", "--format", "{{.State.Running}}", container) != "true":
            raise RuntimeError(f"the container stopped:\n{podman.logs(container)}")
        time.sleep(0.2)
    raise RuntimeError(f"not serving with {WORKERS} workers within {SERVE_WITHIN_S}s:\n{podman.logs(container)}")


def order_through(base: str, *, admin: str, customer: str) -> None:
    """The API through the image: a product, an order, the stock it took, and a refusal that changes nothing."""
    with httpx.Client(base_url=base, timeout=10) as c:
        product = {"id": "IMG-1", "name": "Image check", "price_amount": 1250, "currency": "USD", "total_stock": 5}
        r = c.post("/api/products", json=product, headers=_bearer(admin))
        assert r.status_code == 201 and r.json()["available"] == 5, r.text
        r = c.post("/api/preorder", json={"product_id": "IMG-1", "quantity": 2}, headers=_bearer(customer))
        assert r.status_code == 201, r.text
        order = r.json()
        assert (order["status"], order["quantity"], order["amount_due"]) == ("pending", 2, 2500), order
        r = c.post("/api/preorder", json={"product_id": "IMG-1", "quantity": 4}, headers=_bearer(customer))
        assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json", r.text
        r = c.get(f"/api/preorder/{order['order_id']}", headers=_bearer(customer))
        assert r.status_code == 200 and r.json()["status"] == "pending", r.text
        stock = c.get("/api/products/IMG-1").json()
        assert (stock["reserved"], stock["available"]) == (2, 3), stock


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- docker-compose.yml ---------------------------------------------------------------------------------

def check_compose(say: Progress) -> None:
    """podman-compose parses the file, and refuses it without a secret, naming the variable."""
    compose = [str(Path(sys.executable).with_name("podman-compose")), "--file", "docker-compose.yml", "config"]
    env = {k: v for k, v in os.environ.items() if k != "PREORDER_JWT_SECRET"}
    refused = subprocess.run(compose, env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0 and "PREORDER_JWT_SECRET" in refused.stderr, refused
    parsed = subprocess.run([*compose, "--services"], env={**env, "PREORDER_JWT_SECRET": "x" * 32}, cwd=ROOT,
                            capture_output=True, text=True, check=True)
    services = set(parsed.stdout.split())
    assert services == {"postgres", "redis", "migrate", "app"}, services
    say(f"podman-compose config parses docker-compose.yml: {', '.join(sorted(services))}")


if __name__ == "__main__":
    raise SystemExit(main())

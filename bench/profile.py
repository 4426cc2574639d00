"""Optional profiling (`--profile`): py-spy samples the service while wrk runs one scenario, writing a
flame graph (SVG) and the collapsed stacks ("raw"), which summarise() turns into readable text: where the
server's CPU goes, by concern (rate limit, reserve, order write, ...), by layer and by function.
py-spy is not a project dependency; install it into the venv for an investigation (`uv pip install py-spy`).

Only samples of a thread holding the GIL are kept (--gil): a worker thread parked on a condition
variable is not "idle" to py-spy, and the event loop's wait in epoll is not work. With one worker on
one core, GIL samples are close to the server's CPU time."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

# First match wins, tried from the innermost frame outwards: a sample belongs to the most specific layer
# it was executing in (time inside redis-py called from our service counts as Redis client, not service).
LAYERS: list[tuple[str, str]] = [
    ("asyncpg/pool", "asyncpg pool (acquire/release)"),
    ("asyncpg/", "PostgreSQL client (asyncpg)"),
    ("redis/", "Redis client (redis-py)"),
    ("jwt/", "auth (PyJWT)"),
    ("preorder/auth", "auth (preorder.auth)"),
    ("pydantic", "pydantic (validation, dump)"),
    ("orjson", "JSON"),
    ("/json/", "JSON"),
    ("anyio/", "anyio (sync deps in the thread pool)"),
    ("concurrent/futures", "thread pool"),
    ("threading.py", "thread pool"),
    ("fastapi/", "FastAPI (routing, deps, encoding)"),
    ("starlette/", "Starlette (routing, responses, exceptions)"),
    ("uvicorn/", "uvicorn + httptools (HTTP)"),
    ("preorder/", "service code (preorder.*)"),
    ("uuid", "uuid"),
    ("asyncio/", "asyncio machinery"),
    ("uvloop", "event loop"),
    ("logging/", "logging"),
]


def find_py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_record(py_spy: str, *, pid: int, out: Path, fmt: str, duration_s: float, rate: int = 200,
                 native: bool = False) -> subprocess.Popen[bytes]:
    argv = [py_spy, "record", "--pid", str(pid), "--duration", f"{int(duration_s)}", "--rate", str(rate),
            "--format", fmt, "--output", str(out), "--gil"]
    if native:
        argv.append("--native")
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


# Inclusive shares of the things worth deciding about: a sample counts for a concern when any frame on
# its stack contains one of the needles ("function (file"); concerns nest, so they do not add up.
CONCERNS: list[tuple[str, list[str]]] = [
    ("a request, after HTTP parsing (uvicorn run_asgi)", ["run_asgi (uvicorn"]),
    ("  the create: place_order (the service's own work)", ["place_order (preorder/orders/router",
                                                          "create_order (preorder/orders/router"]),
    ("    admission + reservation (Redis, one round trip)", ["Orders._reserve (preorder"]),
    ("    waiting for the order write (group commit)", ["Orders._write (preorder"]),
    ("    to_out + 201 answer built (record -> JSON)", ["to_out (preorder", "Created.__init__ (preorder"]),
    ("  token check", ["TokenVerifier.authenticate (preorder", "current_user (preorder",
                       "bearer_principal (preorder", "TokenVerifier.verify (preorder"]),
    ("  request body read + validation", ["request_body_to_args (fastapi", "Request.body (starlette",
                                          "Request.json (starlette", "model_validate_json (pydantic",
                                          "HotCreate._read (preorder"]),
    ("  request metrics + access line (Observe._record)", ["Observe._record (preorder"]),
    ("  response send (uvicorn)", ["RequestResponseCycle.send (uvicorn"]),
    ("  response model serialisation", ["serialize_response (fastapi"]),
    ("  domain error -> problem+json", ["_domain_error (preorder", "problem (preorder/errors"]),
    ("Redis calls sent and answers handed out (ScriptBatcher._send)", ["ScriptBatcher._send (preorder"]),
    ("group-commit INSERT batches (GroupCommit._run)", ["GroupCommit._run (preorder"]),
    ("redis-py, any call", ["(redis/"]),
    ("  redis-py connection pool get/release", ["ConnectionPool.get_connection (redis", "ConnectionPool.release (redis",
                                                "ConnectionPool.get_available_connection (redis"]),
    ("asyncpg, any call", ["(asyncpg/"]),
    ("  asyncpg pool acquire/release", ["(asyncpg/pool"]),
    ("background loops in the server process (sweeper, reconciler)", ["run_forever (preorder/workers"]),
    ("events relay (outbox to NATS and webhooks)", ["Relay.run_forever (preorder"]),
]


# Each sample once, to the first of these whose needles match a frame on its stack (the order resolves nesting:
# the background and batched work first, then the parts of a request, then the framework around them), so the
# rows add up to the whole server CPU per request: the README's table of where a create's microseconds go.
BREAKDOWN: list[tuple[str, list[str]]] = [
    ("background loops (sweeper, reconciler, Redis watch)", ["run_forever (preorder/workers"]),
    ("events relay (outbox to NATS and webhooks)", ["Relay.run_forever (preorder"]),
    ("PostgreSQL: the group-commit INSERT of a batch", ["GroupCommit._run (preorder"]),
    ("Redis: the batched admission + reserve call", ["ScriptBatcher._send (preorder"]),
    ("create: queue admission + reserve, await answers", ["Orders._reserve (preorder"]),
    ("create: record -> model -> 201 JSON", ["to_out (preorder", "Created.__init__ (preorder"]),
    ("create: the rest of the service call", ["place_order (preorder/orders/router",
                                              "create_order (preorder/orders/router"]),
    ("token check (cached)", ["TokenVerifier.authenticate (preorder", "TokenVerifier.verify (preorder",
                              "bearer_principal (preorder", "current_user (preorder"]),
    ("body read + validation", ["request_body_to_args (fastapi", "Request.body (starlette", "Request.json (starlette",
                                "model_validate_json (pydantic", "HotCreate._read (preorder"]),
    ("domain error -> problem+json", ["_domain_error (preorder", "problem (preorder/errors"]),
    ("request metrics + access line", ["Observe._record (preorder"]),
    ("response send (uvicorn)", ["RequestResponseCycle.send (uvicorn"]),
    ("framework and middleware around the endpoint", ["run_asgi (uvicorn"]),
    ("HTTP parsing, event loop, protocol callbacks", [""]),
]


def breakdown(stacks: list[tuple[list[str], int]]) -> Counter[str]:
    rows: Counter[str] = Counter()
    for frames, count in stacks:
        label = next(label for label, needles in BREAKDOWN if any(n in f for f in frames for n in needles))
        rows[label] += count
    return rows


# The part of a request's time none of the concerns under it claims: routing, middleware, exception
# wrappers, dependency solving and sending the response, i.e. the framework's own per-request cost.
_REQUEST = CONCERNS[0][1]
_CLAIMED = [n for label, needles in CONCERNS[1:11] for n in needles]
FRAMEWORK_REST = "  rest: routing, middleware, dependency solving, response send"


def _function(frame: str) -> str:
    """'Orders.create (preorder/orders/service.py:57)' -> 'Orders.create (preorder/orders/service.py)'."""
    name, sep, where = frame.rpartition(" (")
    return f"{name}{sep}{where.rsplit(':', 1)[0]})" if sep and ":" in where else frame


def _stacks(raw: Path) -> Iterator[tuple[list[str], int]]:
    """Collapsed stacks: 'outer;...;inner count' per line, outermost frame first; lines dropped from frames."""
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            yield [_function(f) for f in stack.split(";")], int(count)


def layer_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for needle, layer in LAYERS:
            if needle in frame:
                return layer
    return "other"


def summarise(raw: Path, *, top: int = 25, rate: int = 200, rps: float = 0.0, cpu_us_per_request: float = 0.0) -> str:
    """With the server's measured CPU per request (from /proc, over the sampled run), shares are also given
    as microseconds of CPU per request: what removing that work would save. (GIL samples are not CPU time
    on a busy machine: a thread keeps the GIL while the kernel has it descheduled.)"""
    by_layer: Counter[str] = Counter()
    inclusive_layer: Counter[str] = Counter()
    concerns: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    stacks = list(_stacks(raw))
    for frames, count in stacks:
        total += count
        by_layer[layer_of(frames)] += count
        self_time[frames[-1]] += count
        for layer in {layer for f in frames for needle, layer in LAYERS if needle in f}:
            inclusive_layer[layer] += count
        for frame in set(frames):
            inclusive[frame] += count
        for label, needles in CONCERNS:
            if any(n in f for f in frames for n in needles):
                concerns[label] += count
        in_request = any(n in f for f in frames for n in _REQUEST)
        if in_request and not any(n in f for f in frames for n in _CLAIMED):
            concerns[FRAMEWORK_REST] += count
    if not total:
        return f"{raw}: no samples"

    def pct(n: int) -> str:
        share = f"{100 * n / total:5.1f}%"
        return f"{share} {cpu_us_per_request * n / total:6.0f} us/req" if cpu_us_per_request else share

    head = f"{raw.name}: {total:,} samples holding the GIL"
    if cpu_us_per_request:
        head += f"; server CPU {cpu_us_per_request:,.0f} us per request at {rps:,.0f} req/s while sampled"
    out = [head, "", "by concern (inclusive, nested):"]
    out += [f"  {pct(concerns[label])}  {label}" for label, _ in CONCERNS[:11]]
    out += [f"  {pct(concerns[FRAMEWORK_REST])}  {FRAMEWORK_REST}"]
    out += [f"  {pct(total - concerns[CONCERNS[0][0]])}  outside a request's ASGI call: HTTP parsing, event loop, "
            "protocol callbacks, background loops"]
    out += [f"  {pct(concerns[label])}  {label}" for label, _ in CONCERNS[11:]]
    parts = breakdown(stacks)
    out += ["", "where the CPU goes (each sample once; adds up to 100%):"]
    out += [f"  {pct(parts[label])}  {label}" for label, _ in BREAKDOWN]
    out += ["", "by layer (innermost frame wins; adds up to 100%):"]
    out += [f"  {pct(n)}  {layer}" for layer, n in by_layer.most_common()]
    out += ["", "by layer, inclusive (a sample counts for every layer on its stack):"]
    out += [f"  {pct(n)}  {layer}" for layer, n in inclusive_layer.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {pct(n)}  {frame}" for frame, n in self_time.most_common(top)]
    out += ["", f"top {top} functions by inclusive time:"]
    out += [f"  {pct(n)}  {frame}" for frame, n in inclusive.most_common(top)]
    return "\n".join(out)


if __name__ == "__main__":  # python -m bench.profile results/profile-create.txt [cpu-us-per-request]
    cpu_arg = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    print(summarise(Path(sys.argv[1]), cpu_us_per_request=cpu_arg))

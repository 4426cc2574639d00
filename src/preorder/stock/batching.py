"""Coalesce the reservations of one event-loop turn: one script call per product, one Redis pipeline in all.

Under a flash sale many requests reach the reserve step in the same turn of the loop. Their asks for one
product go to reserve.lua together, as one EVALSHA that reserves them in order (the same outcome as one call
each, since a script runs atomically); the calls for different products share one non-transactional
pipeline. So a turn costs one connection checkout, one write and one read, and redis-py encodes and parses
one command per product instead of one per request (measured: redis-py was ~30 us of a create).

On Redis Cluster the same pipeline is redis-py's ClusterPipeline: it routes each EVALSHA by its first key (the
product's slot), sends one pipeline per node concurrently, and re-sends alone, following the redirect, a call
answered MOVED, ASK or TRYAGAIN (a slot moved or moving). redis-py blocks `pipe.evalsha` on a cluster pipeline
(redis-py issue #2914, since lifted upstream) though routing it is sound, so the command is queued with
`execute_command`, which both pipelines accept."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from preorder import metrics, tracing
from preorder.cache import RedisClient

Head = tuple[tuple[str, ...], tuple[Any, ...]]  # the keys and arguments every ask of one call shares


@dataclass
class _Call:
    script: AsyncScript
    keys: list[str | bytes] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)
    futures: list[asyncio.Future[Any]] = field(default_factory=list)


class ScriptBatcher:
    """Runs scripts whose KEYS and ARGV are a shared head followed by a fixed number of entries per ask, and
    which answer with one reply per ask (reserve.lua, limits.lua, unpaid.lua's give-backs). Asks of different
    scripts made in the same loop turn share its pipeline: the customer's limits cost no round trip of their own."""

    def __init__(self, redis: RedisClient, script: AsyncScript, *, max_asks: int = 128) -> None:
        self._redis, self._script, self._max_asks = redis, script, max_asks
        self._pending: dict[tuple[str, Head, int], list[_Call]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, head: Head, *, keys: Sequence[str | bytes], args: list[Any], script: AsyncScript | None = None,
                 group: int = 0) -> asyncio.Future[Any]:
        """Queue one ask of `script` (the batcher's own by default). Asks with the same script, head and group
        go in one call: on Redis Cluster the group is the keys' slot, as a script may touch only one slot."""
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)  # runs after the requests already ready in this turn joined
        script = script or self._script
        slot = (script.sha, head, group)
        calls = self._pending.get(slot)
        if calls is None or len(calls[-1].futures) >= self._max_asks:
            call = _Call(script, [*head[0]], [*head[1]])
            self._pending.setdefault(slot, []).append(call)
        else:
            call = calls[-1]
        future: asyncio.Future[Any] = loop.create_future()
        call.keys += keys
        call.args += args
        call.futures.append(future)
        return future

    def _flush(self) -> None:
        batch = [call for calls in self._pending.values() for call in calls]
        self._pending = {}
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # keep a reference until it is done
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Call]) -> None:
        started = time.perf_counter()
        try:
            results = await self._execute(batch)
        except Exception as exc:  # Redis unreachable: every caller gets the error (and answers 503)
            results = [exc] * len(batch)
        reserves = [call for call in batch if call.script is self._script]  # the others share its pipeline
        if reserves:
            metrics.RESERVE_SECONDS.observe(time.perf_counter() - started)
        for call in reserves:
            metrics.RESERVE_ASKS.observe(len(call.futures))
        for call, result in zip(batch, results, strict=True):
            for i, future in enumerate(call.futures):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result[i])

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        results = await self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, rx.NoScriptError)]
        if missing:  # the script cache was flushed: load them, then run again only the calls that did not run
            for script in {batch[i].script.sha: batch[i].script for i in missing}.values():
                await self._redis.script_load(script.script)  # on a cluster: on every primary
            for i, result in zip(missing, await self._pipeline([batch[i] for i in missing]), strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        # With traces on, every call goes through redis-py, whose instrumentation makes the Redis spans.
        if not isinstance(self._redis, RedisCluster) and not tracing.clients_traced():
            return await self._write_direct(self._redis, batch)
        if len(batch) == 1:  # the hot product alone: no pipeline object needed
            call = batch[0]
            try:
                return [await self._redis.evalsha(call.script.sha, len(call.keys), *call.keys, *call.args)]
            except rx.NoScriptError as exc:
                return [exc]
        return await self._client_pipeline(batch)

    async def _client_pipeline(self, batch: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        return list(await pipe.execute(raise_on_error=False))

    async def _write_direct(self, redis: Redis, batch: list[_Call]) -> list[Any]:
        """The calls written at once on one pooled connection and their replies read in order: what redis-py's
        pipeline does, without its per-command bookkeeping (measured: about half its CPU on the create path).
        A connection found broken while writing ran nothing, so the batch goes again through redis-py's
        retrying pipeline; a failure while reading is the callers' 503 (holds it may have made are orphans the
        reconciler releases, as for a process that died between reserve and write)."""
        pool = redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            try:
                await conn.send_packed_command(conn.pack_commands(
                    [("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args) for call in batch]))
            except (rx.ConnectionError, rx.TimeoutError):
                await conn.disconnect()
                return await self._client_pipeline(batch)
            results: list[Any] = []
            for _ in batch:
                try:
                    results.append(await conn.read_response())
                except rx.ResponseError as exc:  # this call's error (NOSCRIPT, a script error): the others stand
                    results.append(exc)
            return results
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

"""Coalesce the reserve script calls of one event-loop turn into one Redis pipeline.

Under a flash sale many requests reach the reserve step in the same turn of the loop; sending their EVALSHAs
in one non-transactional pipeline costs one connection checkout and one write/read instead of one each.
Every script still runs atomically on its own; a pipeline only shares the round trip."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

Call = tuple[list[str], list[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: aioredis.Redis, script: AsyncScript) -> None:
        self._redis, self._script = redis, script
        self._pending: list[Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def __call__(self, *, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)  # runs after the requests already ready in this turn joined
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((keys, args, future))
        return future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)  # keep a reference until it is done
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[Call]) -> None:
        try:
            results = await self._execute(batch)
        except Exception as exc:  # Redis unreachable: every caller gets the error (and answers 503)
            results = [exc] * len(batch)
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[Call]) -> list[Any]:
        results = await self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # the script cache was flushed: load it, then run again only the calls that did not run
            await self._redis.script_load(self._script.script)
            for i, result in zip(missing, await self._pipeline([batch[i] for i in missing]), strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

"""Signing keys from an identity provider's JWKS document (Auth0, Keycloak, Cognito, Entra ...).

Fetched with httpx on the event loop (PyJWT's PyJWKClient uses blocking urllib), parsed by PyJWT's PyJWKSet.
The keys are cached; a token naming a `kid` the cache lacks, or a cache older than max_age_s, triggers a
refetch, but at most one fetch per min_interval_s whatever the traffic: a flood of made-up kids can't hammer
the provider. A failed fetch keeps the cached keys (the provider being down breaks no token it signed before)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from preorder.errors import Unauthorized

log = logging.getLogger("preorder.auth")
ALGORITHMS = frozenset({"RS256", "ES256"})


class JwksKeys:
    def __init__(self, url: str, *, min_interval_s: float, max_age_s: float, timeout_s: float = 2.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._url, self._min_interval_s, self._max_age_s = url, min_interval_s, max_age_s
        self._on_change = on_change
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = self._tried_at = -float("inf")
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key_for(self, token: str) -> PyJWK:
        """The key that must have signed this token, or 401."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}") from exc
        if not isinstance(kid, str):
            raise Unauthorized("Invalid token: no key id (kid) in its header")
        if kid not in self._keys or time.monotonic() - self._fetched_at > self._max_age_s:
            await self._refresh()
        key = self._keys.get(kid)
        if key is None:
            raise Unauthorized("Invalid token: signed by a key the identity provider does not publish")
        return key

    async def _refresh(self) -> None:
        async with self._lock:  # concurrent askers wait for one fetch, then find it recent
            if time.monotonic() - self._tried_at < self._min_interval_s:
                return
            self._tried_at = time.monotonic()  # failures count too: a provider that is down is not hammered
            self.fetches += 1
            try:
                response = await self._http.get(self._url)
                response.raise_for_status()
                keys = _usable(PyJWKSet.from_dict(response.json()))
            except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
                log.warning("JWKS fetch from %s failed, keeping %d cached keys: %r", self._url, len(self._keys), exc)
                return
            self._fetched_at = time.monotonic()
            if keys.keys() != self._keys.keys():
                self._on_change()  # tokens verified with a key that is gone must not stay accepted from a cache
            self._keys = keys

    async def aclose(self) -> None:
        await self._http.aclose()


def _usable(keyset: PyJWKSet) -> dict[str, PyJWK]:
    """Signing keys with an id and an algorithm this service accepts (RS256, ES256)."""
    return {k.key_id: k for k in keyset.keys
            if k.key_id and k.algorithm_name in ALGORITHMS and k.public_key_use in (None, "sig")}

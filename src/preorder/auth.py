"""Bearer JWT -> Principal. The algorithm comes from configuration, never from the token."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from preorder.errors import Forbidden, Unauthorized
from preorder.jwks import JwksKeys
from preorder.settings import Settings
from preorder.types import ID_RE

Role = Literal["customer", "admin"]
_CACHE_LIMIT = 50_000


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class TokenVerifier:
    """Verifies tokens once and remembers the result until the token expires (hot-path saving). Keys come from
    the settings (HS256 secret, RS256 public key) or from the identity provider's JWKS document."""

    def __init__(self, settings: Settings) -> None:
        self._algorithm = settings.jwt_algorithm
        self._key = settings.jwt_secret if self._algorithm == "HS256" else settings.jwt_public_key
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer or None
        self._roles = RoleMapping(settings)
        self._subject_claim = settings.jwt_subject_claim
        self._cache: dict[str, tuple[Principal, float]] = {}
        self.jwks = JwksKeys(settings.jwt_jwks_url, min_interval_s=settings.jwt_jwks_min_interval_s,
                             max_age_s=settings.jwt_jwks_max_age_s, on_change=self._cache.clear
                             ) if settings.jwt_jwks_url else None

    async def authenticate(self, token: str) -> Principal:
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        if self.jwks is None:
            return self._remember(token, self._key, self._algorithm)
        key = await self.jwks.key_for(token)
        return self._remember(token, key.key, key.algorithm_name)

    def verify(self, token: str) -> Principal:
        """Synchronous, with the configured static key only (the `preorder` tools and the bare benchmark app)."""
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        return self._remember(token, self._key, self._algorithm)

    def _remember(self, token: str, key: Any, algorithm: str) -> Principal:
        principal, exp = self._decode(token, key, algorithm)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (principal, exp)
        return principal

    def _decode(self, token: str, key: Any, algorithm: str) -> tuple[Principal, float]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],  # one algorithm, from configuration or the provider's key: never the token
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", self._subject_claim, "aud", *(["iss"] if self._issuer else [])]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"Invalid token: {exc}") from exc
        sub = claims[self._subject_claim]
        # The subject becomes the order's user_id, a Redis key part and a filter value: hold it to the same
        # rule as every other id (no NUL for PostgreSQL, no braces to break a Redis Cluster hash tag).
        if not isinstance(sub, str) or not ID_RE.fullmatch(sub):
            raise Unauthorized("Invalid token: the subject must be 1-64 of A-Z a-z 0-9 _ -")
        return Principal(sub=sub, role=self._roles.role(claims)), float(claims["exp"])

    async def aclose(self) -> None:
        if self.jwks is not None:
            await self.jwks.aclose()


class RoleMapping:
    """Which claim carries the role and which values mean admin and customer: `role` = admin|customer by
    default; `roles` (Entra), `realm_access.roles` (Keycloak), `cognito:groups`, `scope` (space-separated) ..."""

    def __init__(self, settings: Settings) -> None:
        self._claim, self._admin, self._customer = (settings.jwt_role_claim, settings.jwt_admin_role,
                                                    settings.jwt_customer_role)

    def role(self, claims: dict[str, Any]) -> Role:
        values = _values(_claim(claims, self._claim))
        if self._admin in values:
            return "admin"
        if not self._customer or self._customer in values:
            return "customer"
        raise Unauthorized(f"Invalid token: unknown role (claim {self._claim})")


def _claim(claims: dict[str, Any], name: str) -> Any:
    """The claim by its full name (Auth0's namespaced URLs hold dots), else as a dotted path into objects."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _values(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []


def mint_token(settings: Settings, *, sub: str, role: Role, ttl_s: int = 86_400, key: str = "") -> str:
    """For development and tests: sign with the configured HS256 secret (or the given private key)."""
    claims = {"sub": sub, "role": role, "aud": settings.jwt_audience, "exp": int(time.time()) + ttl_s}
    return jwt.encode(claims, key or settings.jwt_secret, algorithm=settings.jwt_algorithm)


_bearer = HTTPBearer(auto_error=False, description="JWT with claims sub, role, exp, aud=preorder")


async def current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("Missing bearer token")
    verifier: TokenVerifier = request.app.state.verifier
    return await verifier.authenticate(credentials.credentials)


async def bearer_principal(request: Request) -> Principal:
    """current_user in one step, for the hot route: FastAPI's security-scheme dependency costs a second
    dependency level per request (measured on POST /api/preorder). The route declares the scheme itself
    (BEARER_SECURITY), so /docs and the OpenAPI document are unchanged."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token")
    verifier: TokenVerifier = request.app.state.verifier
    return await verifier.authenticate(token.strip())


BEARER_SECURITY: dict[str, Any] = {"security": [{"HTTPBearer": []}]}


async def admin_user(principal: Annotated[Principal, Depends(current_user)]) -> Principal:
    if not principal.is_admin:
        raise Forbidden("Admin role required")
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]
Admin = Annotated[Principal, Depends(admin_user)]

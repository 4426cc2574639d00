"""HotCreate answers the ordinary POST /api/preorder beside the framework; anything else reaches the route, which
answers it exactly as before. Both answer a create alike."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from preorder.orders import repository as repo
from preorder.orders.hot import HotCreate
from preorder.orders.schemas import OrderOut, order_json
from preorder.orders.service import to_out
from tests.conftest import bearer, make_product
from tests.invariants import assert_invariants

ME = bearer("U-hot")
ROUTE_ONLY = {"Content-Type": "application/json; charset=utf-8"}  # not the exact type HotCreate takes


class Passed:
    """Counts the requests HotCreate hands on to the app."""

    def __init__(self, app: ASGIApp) -> None:
        self.app, self.calls = app, 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/api/preorder" and scope["method"] == "POST":
            self.calls += 1
        await self.app(scope, receive, send)


async def passed_on(app: FastAPI, client: Any) -> Passed:
    await client.get("/healthz")  # builds the middleware stack
    layer: Any = app.middleware_stack
    while not isinstance(layer, HotCreate):
        layer = layer.app
    layer.app = Passed(layer.app)
    return layer.app


def shape(response: Any) -> tuple[int, set[str], set[str]]:
    names = {n for n in response.headers if n not in ("x-request-id",)}
    return response.status_code, names, set(response.json())


async def test_the_hot_path_answers_a_create_as_the_route_does(app, client, db, redis):
    await make_product(client, total_stock=10)
    passed = await passed_on(app, client)
    body = {"product_id": "P1001", "quantity": 2}
    hot = await client.post("/api/preorder", json=body, headers=ME)
    assert passed.calls == 0, "answered beside the framework"
    routed = await client.post("/api/preorder", content=b'{"product_id": "P1001", "quantity": 2}',
                               headers={**ME, **ROUTE_ONLY})
    assert passed.calls == 1, "a content type HotCreate does not take goes to the route"
    assert shape(hot) == shape(routed)
    assert hot.headers["location"] == f"/api/preorder/{hot.json()['order_id']}"
    assert hot.headers["content-type"] == routed.headers["content-type"] == "application/json"
    same = {k: v for k, v in hot.json().items() if k not in ("order_id", "created_at", "updated_at", "pay_by")}
    assert same == {k: v for k, v in routed.json().items() if k in same}
    await assert_invariants(db, redis, created={hot.json()["order_id"]: 2, routed.json()["order_id"]: 2})


async def test_refusals_and_replays_are_answered_on_the_hot_path(app, client, db, redis):
    await make_product(client, total_stock=1)
    passed = await passed_on(app, client)
    keyed = {**ME, "Idempotency-Key": "hot-1"}
    first = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=keyed)
    again = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=keyed)
    sold_out = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1},
                                 headers=bearer("U-late"))
    unknown = await client.post("/api/preorder", json={"product_id": "NOPE", "quantity": 1}, headers=ME)
    assert passed.calls == 0
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    assert sold_out.status_code == 409 and sold_out.headers["content-type"] == "application/problem+json"
    assert sold_out.json()["instance"] == f"urn:request:{sold_out.headers['x-request-id']}"
    assert unknown.status_code == 404 and unknown.json()["type"] == "/problems/not-found"
    metrics = (await client.get("/metrics")).text
    assert "route=\"/api/preorder\",status_class=\"4xx\"" in metrics, "labelled by the route template"
    await assert_invariants(db, redis, created={first.json()["order_id"]: 1})


@pytest.mark.parametrize(("content", "headers", "status", "kind"), [
    (b'{"product_id": "P1001", "quantity": 0}', {}, 400, "validation-error"),
    (b'{"product_id": "P1001", "quantity": 1, "extra": 1}', {}, 400, "validation-error"),
    (b'{"product_id": "P1001", "quantity": 1', {}, 400, "validation-error"),  # FastAPI: json_invalid
    (b'{"product_id": "P1001", "quantity": 1}', {"Authorization": "Basic abc"}, 401, "unauthorized"),
    (b'{"product_id": "P1001", "quantity": 1}', {"Authorization": "Bearer not-a-jwt"}, 401, "unauthorized"),
    (b'{"product_id": "P1001", "quantity": 1}', {"Idempotency-Key": "has space"}, 400, "validation-error"),
    (b'{"product_id": "P1001", "quantity": 1, "pad": "' + b"x" * 20_000 + b'"}', {}, 413, "payload-too-large"),
])
async def test_bad_requests_reach_the_route_and_change_nothing(app, client, db, redis, content, headers, status,
                                                              kind):
    await make_product(client, total_stock=5)
    passed = await passed_on(app, client)
    response = await client.post("/api/preorder", content=content,
                                 headers={**ME, "Content-Type": "application/json", **headers})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(kind)
    assert passed.calls == 1, "the route answered it"
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    await assert_invariants(db, redis, created={})


async def test_rows_become_the_models_model_construct_builds(client, db):
    await make_product(client, total_stock=5)
    created = await client.post("/api/preorder", json={"product_id": "P1001", "quantity": 1}, headers=ME)
    row = await repo.get(db, uuid.UUID(created.json()["order_id"]), user_id=None)
    fast, generic = to_out(row), OrderOut.model_construct(**dict(row))
    assert fast == generic and fast.model_fields_set == generic.model_fields_set
    assert fast.__pydantic_extra__ == generic.__pydantic_extra__
    assert fast.__pydantic_private__ == generic.__pydantic_private__
    assert order_json(fast) == order_json(generic) == created.content

"""/docs reads as a manual for the storefront developers: every route of the app (whoever added it) has a
summary and a description saying who may call it and what it changes, request bodies carry examples (the
create example is the seed's body), and every error response lists its problem types, each with an example.
Every problem type the service defines is documented on some route."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from preorder.app import create_app
from preorder.errors import DomainError
from tests.conftest import make_settings

PROBLEM = "application/problem+json"
SEED_BODY = {"product_id": "P1001", "quantity": 2, "user_id": "U123"}
APP = create_app(make_settings("postgresql://unused", "redis://unused"))
DOC = APP.openapi()


def _routes(app: FastAPI) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    """Every API route, included routers flattened (their prefixes applied), as FastAPI itself walks them."""
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute) and route.original_route.include_in_schema:
            for method in sorted(route.methods or ()):
                yield route, method, DOC["paths"][route.path_format][method.lower()]


ROUTES = list(_routes(APP))
IDS = [f"{method} {route.path_format}" for route, method, _ in ROUTES]


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return DOC["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def _kinds(cls: type[DomainError]) -> set[str]:
    return {f"/problems/{cls.kind}"} | {k for sub in cls.__subclasses__() for k in _kinds(sub)}


def test_every_route_of_the_app_is_checked() -> None:
    assert len(ROUTES) >= 14, IDS  # orders 6, products 4, audit 1, service 3, and whatever others add


@pytest.mark.parametrize(("route", "method", "op"), ROUTES, ids=IDS)
def test_each_route_says_who_may_call_it_and_what_it_changes(route: Any, method: str, op: dict[str, Any]):
    assert route.summary, "an explicit summary= (not one FastAPI derives from the function name)"
    assert op["summary"] == route.summary
    description = op.get("description", "")
    assert "**Who may call:**" in description and "**Changes:**" in description, description


@pytest.mark.parametrize(("route", "method", "op"), ROUTES, ids=IDS)
def test_each_request_body_carries_an_example(route: Any, method: str, op: dict[str, Any]):
    body = op.get("requestBody")
    if body is None:
        return
    media = body["content"]["application/json"]
    examples = media.get("examples") or _resolve(media["schema"]).get("examples")
    assert examples, f"{method} {route.path_format}: no example for its body"


def test_the_create_example_is_the_seed_body() -> None:
    schema = _resolve(DOC["paths"]["/api/preorder"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert schema["examples"][0] == SEED_BODY


@pytest.mark.parametrize(("route", "method", "op"), ROUTES, ids=IDS)
def test_each_error_response_lists_its_problem_types(route: Any, method: str, op: dict[str, Any]):
    known = _kinds(DomainError)
    for code, response in op["responses"].items():
        if not code.startswith(("4", "5")) or route.path_format == "/readyz":  # readyz answers its own JSON
            continue
        media = response["content"][PROBLEM]
        declared = media["schema"]["allOf"][1]["properties"]["type"]["enum"]
        assert declared and set(declared) <= known, (code, declared)
        assert {e["value"]["type"] for e in media["examples"].values()} == set(declared)
        assert all(t in response["description"] for t in declared), "the text names the types too"
        assert {e["value"]["status"] for e in media["examples"].values()} == {int(code)}
    if op.get("parameters") or op.get("requestBody"):
        assert "400" in op["responses"], "input can be invalid: 400 must be listed"


def test_every_problem_type_is_documented_somewhere() -> None:
    documented = {t for _, _, op in ROUTES for r in op["responses"].values()
                  for t in r.get("content", {}).get(PROBLEM, {}).get("schema", {}).get("allOf", [{}, {}])[1]
                  .get("properties", {}).get("type", {}).get("enum", [])}
    assert _kinds(DomainError) - documented == set()

"""README is a contract: its configuration table and the Settings class list the same settings, with the same
defaults, so the two cannot drift apart again; its deposit presale example is replayed call by call."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from preorder.settings import Settings
from tests.conftest import ADMIN, bearer
from tests.invariants import assert_invariants

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_settings() -> dict[str, str]:
    """variable -> default, from the table under '## Configuration'."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`PREORDER_[A-Z0-9_]+`", cells[0]):
            rows[cells[0].strip("`")] = cells[1].strip("`")
    return rows


def shown(default: Any) -> str:
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_readme_lists_exactly_the_settings_the_class_reads():
    documented = readme_settings()
    declared = {f"PREORDER_{name.upper()}" for name in Settings.model_fields}
    assert set(documented) == declared, (
        f"in Settings only: {sorted(declared - set(documented))}; in README only: {sorted(set(documented) - declared)}")


def test_readme_defaults_are_the_class_defaults():
    documented = readme_settings()
    for name, field in Settings.model_fields.items():
        assert documented[f"PREORDER_{name.upper()}"] == shown(field.default), name


# ---- the deposit presale's worked example, replayed ----------------------------------------------------------

_CURL = re.compile(r"curl -X (\w+) localhost:8000(\S+) -H \"Authorization: Bearer \$(\w+)\".*?-d '(.*?)'", re.S)
_PAIR = re.compile(r'"(\w+)": ("[^"]*"|\d+)')


def worked_example() -> list[tuple[tuple[str, str, str, dict[str, Any]], list[str]]]:
    """The curl calls of README's deposit example (method, path, token, body), each with the comment lines that
    follow it (what it answers)."""
    section = README.read_text().split("### Deposit presales", 1)[1].split("Worked example", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    calls = []
    for m in _CURL.finditer(block):
        rest = block[m.end():].split("curl -X", 1)[0]
        comments = [line.lstrip("# ") for line in rest.splitlines() if line.startswith("#")]
        calls.append(((m[1], m[2], m[3], json.loads(m[4])), comments))
    return calls


def claimed(comment: str) -> dict[str, Any]:
    """The "key": value pairs a `-> 201 {...}` comment shows."""
    return {k: json.loads(v) for k, v in _PAIR.findall(comment)}


async def test_the_deposit_worked_example_answers_what_readme_says(client, app, db, redis) -> None:
    calls = worked_example()
    assert [c[0][:3] for c in calls] == [("POST", "/api/products", "ADMIN"), ("POST", "/api/preorder", "U1"),
                                         ("POST", "/api/preorder/$ID/payments", "U1"),
                                         ("POST", "/api/preorder/$ID/payments", "U1")]
    tokens = {"ADMIN": ADMIN, "U1": bearer("U1")}
    (product, _), (create, create_says), (deposit, deposit_says), (balance, balance_says) = calls
    # The example's dates, moved to stay in the future whenever the test runs (the window's length kept).
    body = dict(product[3])
    opens, closes = (datetime.fromisoformat(body[k]) for k in ("balance_starts_at", "balance_ends_at"))
    start = datetime.now(UTC) + timedelta(days=1)
    body["balance_starts_at"], body["balance_ends_at"] = start.isoformat(), (start + (closes - opens)).isoformat()
    assert (await client.post(product[1], json=body, headers=tokens[product[2]])).status_code == 201

    r = await client.post(create[1], json=create[3], headers=tokens[create[2]])
    assert create_says[0].startswith("-> 201") and r.status_code == 201, r.text
    assert claimed(create_says[0]).items() <= r.json().items(), (create_says[0], r.json())
    order_id = r.json()["order_id"]

    def answered(r: Any) -> dict[str, Any]:
        return {**r.json(), **r.json()["payment"], **r.json()["order"]}

    r = await client.post(deposit[1].replace("$ID", order_id), json=deposit[3], headers=tokens[deposit[2]])
    assert deposit_says[0].startswith("-> 201") and r.status_code == 201, r.text
    assert claimed(deposit_says[0]).items() <= answered(r).items(), (deposit_says[0], r.json())
    assert r.json()["refunds"] == []

    path = balance[1].replace("$ID", order_id)
    assert "409 /problems/balance-window-not-open" in deposit_says[1] and "balance_starts_at" in deposit_says[1]
    early = await client.post(path, json={**balance[3], "reference": "PAY-B-EARLY"}, headers=tokens[balance[2]])
    assert early.status_code == 409 and early.json()["type"] == "/problems/balance-window-not-open", early.text
    assert datetime.fromisoformat(early.json()["balance_starts_at"]) == start

    app.state.orders.clock.advance((start - datetime.now(UTC)).total_seconds() + 1)
    r = await client.post(path, json=balance[3], headers=tokens[balance[2]])
    assert balance_says[0].startswith("-> 201") and r.status_code == 201, r.text
    assert claimed(balance_says[0]).items() <= answered(r).items(), (balance_says[0], r.json())
    price, qty = body["price_amount"], create[3]["quantity"]
    inflation = (body["deposit_credit"] - body["deposit_amount"]) * qty
    assert f"keeps {price * qty - inflation} ({price * qty} less the {inflation} inflation)" in balance_says[0]
    assert r.json()["order"]["paid"] == price * qty - inflation
    await assert_invariants(db, redis, created=[order_id])

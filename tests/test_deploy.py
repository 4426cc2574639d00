"""The deployment kit names only what the service really exports: every metric the Grafana dashboard and the alert
rules query is in a running app's /metrics after some traffic. (promtool checks the rules themselves:
`make deploy-check`.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from preorder.workers.loops import run_once
from preorder.workers.reconciler import Reconciler
from tests.conftest import bearer, make_product

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
METRIC = re.compile(r"\b(?:preorder|http_server)_[a-z_]+\b")


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/preorder.json").read_text())
    return [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]


def alert_queries() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_the_dashboard_and_the_alerts_query_something():
    assert len(dashboard_queries()) >= 10 and len(alert_queries()) == 6


async def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(app, client):
    await make_product(client, total_stock=1)
    me = bearer("U-deploy")
    one = {"product_id": "P1001", "quantity": 1}
    order = (await client.post("/api/preorder", json=one, headers=me)).json()
    assert (await client.post("/api/preorder", json=one, headers=me)).status_code == 409
    assert (await client.delete(f"/api/preorder/{order['order_id']}", headers=me)).status_code == 200
    orders = app.state.orders
    await run_once(orders, Reconciler(orders.stock, orphan_hold_s=60, full_interval_s=900))
    scraped = await client.get("/metrics")
    exported = {s.name for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    queried = {name for query in dashboard_queries() + alert_queries() for name in METRIC.findall(query)}
    assert len(queried) > 15
    missing = queried - exported
    assert not missing, f"queried but never exported: {sorted(missing)}"

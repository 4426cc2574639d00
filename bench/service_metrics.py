"""The service's own `/metrics`, read by the benchmark's reports (sustained steps, bench.waits)."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


def sums(text: str, names: Mapping[str, str], *, route: str | None = None) -> dict[str, float]:
    """For each key, the samples named names[key] summed over their label sets; with `route`, a sample that has a
    route label counts only for that route (request histograms are per route, the service's own metrics are not)."""
    wanted = {name: key for key, name in names.items()}
    found = dict.fromkeys(names, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None and (route is None or sample.labels.get("route", route) == route):
                found[key] += sample.value
    return found

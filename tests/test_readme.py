"""README is a contract: its configuration table and the Settings class list the same settings, with the same
defaults, so the two cannot drift apart again."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from preorder.settings import Settings

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

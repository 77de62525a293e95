"""docs/actions.md is checked against the code it documents."""

from __future__ import annotations

import re

from layers.actions.catalog import CATALOG
from layers.actions.catalog_docs import catalog_table
from layers.actions.policy import NEVER_START_PREFIXES, NEVER_START_UNITS, RUNS_AT, SHOW_PROPERTIES
from tests.support import REPO


def test_catalog_table_in_docs_matches_the_catalog() -> None:
    text = (REPO / "docs" / "actions.md").read_text()
    assert catalog_table() in text, "regenerate: python -m layers.actions.catalog_docs"
    for name in CATALOG:
        assert f"`{name}`" in text


def test_autonomy_matrix_in_docs_matches_the_policy() -> None:
    text = (REPO / "docs" / "actions.md").read_text()
    risks = ["read-only", "low", "medium", "high"]
    for level, runs in RUNS_AT.items():
        row = re.search(rf"^\| `{level}`[^|]*\|(.*)\|\s*$", text, re.M)
        assert row, level
        cells = [c.strip().strip("*") for c in row.group(1).split("|")]
        assert cells == ["run" if r in runs else "wait" for r in risks], (level, cells)


def test_never_start_list_and_systemctl_show_in_docs_match_the_policy() -> None:
    text = (REPO / "docs" / "actions.md").read_text()
    missing = [u for u in sorted(NEVER_START_UNITS) if f"`{u}`" not in text]
    assert missing == [], "docs/actions.md: Units never started"
    assert all(f"`{p}`" in text for p in NEVER_START_PREFIXES)
    assert f"systemctl show --property={','.join(SHOW_PROPERTIES)} -- <unit>" in text

"""docs/configuration.md documents every field with its default: it is generated from
the typed settings, and this test fails when someone changes one without the other."""

from __future__ import annotations

from pathlib import Path

from layers.config import Settings
from layers.config_docs import render

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == render(), (
        "docs/configuration.md is stale: run `python -m layers.config_docs > docs/configuration.md`"
    )


def test_every_field_has_a_description() -> None:
    def walk(model: type, prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            key = f"{prefix}{name}"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                missing += walk(sub, key + ".")
            elif not field.description:
                missing.append(key)
        return missing

    assert walk(Settings, "") == []

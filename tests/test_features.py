"""The registry of V2 features V3 lacks drives the planner, the settings, the guide, the preview and
the usage report: each of them names every unit, by the unit's own name, and nothing else."""

from __future__ import annotations

import pytest

from proxy import audit, mappings
from proxy.guide import guide
from proxy.settings import Settings
from proxy.translate.features import ALL, REGISTRY
from proxy.v2.models import V2_FIELDS

UNITS = {type(unit).__name__: unit for unit in REGISTRY}


@pytest.mark.parametrize("name", list(UNITS))
def test__unit__declares_fields_policies_and_a_docstring_for_client_teams(name):
    unit = UNITS[name]
    assert name[0].isupper() and not name.endswith("Feature")  # verb-first class names
    assert set(unit.fields) <= set(V2_FIELDS)
    assert unit.default in unit.allowed and set(unit.allowed) <= set(ALL)
    assert set(unit.effects) == set(unit.allowed)
    assert len(unit.summary()) > 40 and unit.v3


def test__units__have_unique_policy_names():
    assert len({unit.name for unit in REGISTRY}) == len(REGISTRY)


def test__settings__have_one_policy_per_unit_and_no_other():
    policies = {name.removeprefix("policy_") for name in Settings.model_fields if name.startswith("policy_")}
    assert policies == {unit.name for unit in REGISTRY}
    assert Settings().policies() == {unit.name: unit.default for unit in REGISTRY}


def test__guide__has_a_section_per_unit_with_its_text():
    text = guide(mappings.load())
    for name, unit in UNITS.items():
        assert f"### {name} (" in text and unit.summary() in text and unit.v3 in text


def test__usage_report__tells_each_units_v3_way_by_its_name():
    events = [{"event": audit.EVENT, "fingerprint": "fp", "features": {unit.name: "emulate"}} for unit in REGISTRY]
    [row] = audit.report(events)
    shown = {unit.name for unit in REGISTRY if unit.verdict != "same"}
    assert set(row["features"]) == shown
    for name in shown:
        assert row["features"][name]["v3"] == next(u.v3 for u in REGISTRY if u.name == name)

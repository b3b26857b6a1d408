"""Site and federation policies: presets, validation with one message per problem, the CLI."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from node.cli import app
from policies import (
    DEFAULT_SITE_POLICY,
    FederationPolicy,
    PolicyError,
    SitePolicy,
    load_policy,
    load_site_policy,
    parse_policy,
)

runner = CliRunner()


def test_strict_is_the_default_and_keeps_nothing():
    strict = load_site_policy(DEFAULT_SITE_POLICY)
    assert DEFAULT_SITE_POLICY == "strict"
    assert strict.deid.options == []
    assert strict.retain.age == "none" and strict.retain.sex is False
    assert strict.crop.mode == "labelled"
    assert strict.dp.enabled
    assert strict.method_codes() == [("113100", "Basic Application Confidentiality Profile")]


def test_research_preset_shifts_dates_and_keeps_coarse_characteristics():
    research = load_site_policy("research")
    assert research.deid.shifts_dates
    assert research.retain.age == "5y-bands"
    assert ("113107", "Retain Longitudinal Temporal Information Modified Dates") in (
        research.method_codes()
    )


def test_presets_round_trip_through_yaml(tmp_path):
    for name in ("strict", "research", "federation"):
        result = runner.invoke(app, ["policy", "show", name])
        assert result.exit_code == 0
        path = tmp_path / f"{name}.yaml"
        path.write_text(result.stdout)
        assert load_policy(path) == load_policy(name)
        assert runner.invoke(app, ["policy", "validate", str(path)]).exit_code == 0


def test_each_problem_is_reported_once(tmp_path):
    bad = {
        "name": "site-a",
        "deid": {"options": ["Clean Pixel", "Retain UIDs"], "date_shift_max_days": 0},
        "crop": {"mode": "box"},
        "labels": {"vocabulary": {0: "bg", 1: "Fat"}},
        "typo_field": 1,
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = runner.invoke(app, ["policy", "validate", str(path)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert all(line.startswith(f"error: {path}: ") for line in lines)
    joined = "\n".join(lines)
    for where in ("deid.options.0", "deid.date_shift_max_days", "crop.mode", "labels.vocabulary",
                  "typo_field"):  # fmt: skip
        assert where in joined
    assert len(lines) == 5


def test_identifying_options_need_explicit_consent():
    with pytest.raises(PolicyError, match="allow_identifying_options"):
        parse_policy({"name": "x", "deid": {"options": ["Retain UIDs"]}})
    ok = parse_policy(
        {"name": "x", "deid": {"options": ["Retain UIDs"], "allow_identifying_options": True}}
    )
    assert isinstance(ok, SitePolicy) and ok.deid.has("Retain UIDs")


def test_inconsistent_policies_are_rejected():
    with pytest.raises(PolicyError, match="Retain Patient Characteristics"):
        parse_policy({"name": "x", "retain": {"sex": True}})
    with pytest.raises(PolicyError, match="one of the two"):
        parse_policy({"name": "x", "deid": {
            "allow_identifying_options": True,
            "options": ["Retain Longitudinal Temporal Information Full Dates",
                        "Retain Longitudinal Temporal Information Modified Dates"]}})  # fmt: skip
    with pytest.raises(PolicyError, match="not in the vocabulary"):
        parse_policy({"name": "x", "labels": {"local_to_vocabulary": {7: 9}}})
    with pytest.raises(PolicyError, match="Clean Pixel Data"):
        box = {"row0": 0, "row1": 2, "col0": 0, "col1": 2}
        mask = {"modality": "US", "rows": 4, "columns": 4, "boxes": [box]}
        parse_policy({"name": "x", "deid": {"pixel_masks": [mask]}})


def test_federation_policy_and_kind_mismatch(tmp_path):
    rounds = {"vqgan": 5, "diffusion": 10}
    fed = parse_policy(
        {
            "kind": "federation",
            "name": "b",
            "min_sites": 3,
            "rounds": rounds,
            "model_preset": "tiny",
        }
    )
    assert isinstance(fed, FederationPolicy) and fed.rounds.diffusion == 10
    with pytest.raises(PolicyError, match="min_sites"):
        parse_policy({"kind": "federation", "name": "x", "min_sites": 0})
    with pytest.raises(PolicyError, match="site policy is needed"):
        load_site_policy("federation")
    path = tmp_path / "p.json"
    path.write_text('{"name": "j", "crop": {"mode": "none"}}')
    assert load_site_policy(path).crop.mode == "none"
    path = tmp_path / "p.toml"
    path.write_text('name = "t"\n[retain]\nage = "none"\n')
    assert load_site_policy(path).name == "t"
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    result = runner.invoke(app, ["policy", "validate", str(path)])
    assert result.exit_code == 2 and "not valid yaml" in result.stderr

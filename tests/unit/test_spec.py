"""Job specs: every shipped spec validates; bad specs name file, field and reason and exit 2."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from mtorl.spec import SpecError, TrainJob, load_job, make_job
from mtorl.spec.loader import apply_overrides, parse_override

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "ray_jobs" / "specs").glob("*.yaml"))


def test_specs_exist_for_both_samples() -> None:
    names = {p.name for p in SPECS}
    for ds in ("kuairand", "criteo"):
        for kind in ("prepare", "train", "evaluate", "tune", "serve"):
            assert f"{ds}-{kind}.yaml" in names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_every_shipped_spec_validates_and_names_its_command(path: Path) -> None:
    load_job(path)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# mtorl "), f"{path.name} must open with the command that runs it"
    assert path.name in first


def test_unknown_field_names_file_field_reason(tmp_path: Path) -> None:
    doc = yaml.safe_load((ROOT / "ray_jobs/specs/kuairand-train.yaml").read_text())
    doc["spec"]["trainer"]["wokers"] = 2
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(doc))
    with pytest.raises(SpecError) as e:
        load_job(f)
    msg = str(e.value)
    assert str(f) in msg and "spec.trainer.wokers" in msg and "Extra inputs are not permitted" in msg


def test_unknown_kind_and_bad_yaml(tmp_path: Path) -> None:
    f = tmp_path / "k.yaml"
    f.write_text("apiVersion: mtorl/v1\nkind: FooJob\nmetadata: {name: x}\nspec: {}\n")
    with pytest.raises(SpecError, match="kind: unknown kind 'FooJob'"):
        load_job(f)
    f.write_text("a: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(f)


def test_overrides_parse_yaml_values_and_validate() -> None:
    assert parse_override("spec.trainer.workers=2") == (["spec", "trainer", "workers"], 2)
    assert parse_override("spec.model.name=bc_seq")[1] == "bc_seq"
    job = load_job(
        ROOT / "ray_jobs/specs/kuairand-train.yaml", ["spec.trainer.workers=1", "spec.objective.reward_weight=0.5"]
    )
    assert isinstance(job, TrainJob)
    assert job.spec.trainer.workers == 1 and job.spec.objective.reward_weight == 0.5
    with pytest.raises(SpecError, match="spec.trainer.workers"):
        load_job(ROOT / "ray_jobs/specs/kuairand-train.yaml", ["spec.trainer.workers=many"])
    assert apply_overrides({"a": 1}, ["b.c=x"]) == {"a": 1, "b": {"c": "x"}}


def test_cross_field_validation() -> None:
    with pytest.raises(SpecError, match="divisible"):
        make_job("TrainJob", "x", {"data": "d", "output": "o", "model": {"hidden": 30, "attention": {"heads": 4}}})
    with pytest.raises(SpecError, match="must be 1"):
        make_job(
            "PrepareJob",
            "x",
            {"source": "journeys", "input": "i", "output": "o", "splits": {"train": 0.5, "val": 0.1, "test": 0.1}},
        )
    with pytest.raises(SpecError, match="metadata.name"):
        make_job("TrainJob", "Bad_Name", {"data": "d", "output": "o"})


def test_decision_ensemble_pessimism_is_a_non_negative_number() -> None:
    base = {"data": "d", "output": "o"}
    for v in (0, 0.0, 1, 2.5):
        job = make_job("TrainJob", "x", {**base, "decision": {"ensemble_pessimism": v}})
        assert job.spec.decision.ensemble_pessimism == float(v)
    assert make_job("TrainJob", "x", base).spec.decision.ensemble_pessimism == 0.0
    with pytest.raises(SpecError) as e:
        make_job("TrainJob", "x", {**base, "decision": {"ensemble_pessimism": -0.1}})
    assert str(e.value).splitlines() == [
        "<TrainJob>: spec.decision.ensemble_pessimism: Input should be greater than or equal to 0 (got -0.1)"]


def test_specs_are_frozen() -> None:
    job = make_job("TrainJob", "x", {"data": "d", "output": "o"})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        job.spec.trainer.workers = 5  # type: ignore[misc]


def test_a_grid_sweep_counts_its_grid_not_max_trials() -> None:
    base = {"data": "s3://b/d", "output": "s3://b/runs"}

    def sweep(algorithm: str, parameters: dict) -> object:
        return make_job("TuneJob", "t", {"base": base, "output": "s3://b/s", "algorithm": algorithm,
                                         "max_trials": 5, "parameters": parameters}).spec

    lr = {"type": "categorical", "values": [0.1, 0.01]}
    mu = {"type": "double", "min": 0.1, "max": 10.0, "log": True}
    assert sweep("grid", {"trainer.lr": lr}).trials == 2
    assert sweep("grid", {"trainer.lr": lr, "objective.reward_weight": mu}).trials == 6  # 3 points per range
    assert sweep("random", {"trainer.lr": lr}).trials == 5
    assert sweep("tpe", {"objective.reward_weight": mu}).trials == 5

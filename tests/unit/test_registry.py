"""One registry maps job kinds to runners: `mtorl explain`, the run command, `mtorl submit` and the
ray_jobs entrypoint all look a kind up there, so a kind missing from it is refused by each in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtorl import registry
from mtorl.cli import main
from mtorl.spec.models import KINDS


def test_every_kind_is_registered_with_an_entrypoint() -> None:
    assert set(registry.REGISTRY) == set(KINDS)
    root = Path(__file__).resolve().parents[2] / "ray_jobs"
    for entry in registry.REGISTRY.values():
        assert entry.model is KINDS[entry.kind]
        assert (root / f"{entry.command}.py").read_text().count(f'run("{entry.command}")') == 1, entry.command


def test_a_kind_removed_from_the_registry_is_refused_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ray_jobs._entry import run as entrypoint

    spec = tmp_path / "sim.yaml"
    spec.write_text("apiVersion: mtorl/v1\nkind: SimulateJob\nmetadata: {name: x}\nspec: {output: "
                    f"{tmp_path / 'out'}, users: 10}}\n")
    monkeypatch.setattr(registry, "REGISTRY", {k: v for k, v in registry.REGISTRY.items() if k != "SimulateJob"})
    calls = {
        "explain": lambda: main(["explain", "SimulateJob"]),
        "run command": lambda: main(["simulate", str(spec)]),
        # refused before any cluster call: the address is never contacted
        "submit": lambda: main(["submit", str(spec), "--address", "http://127.0.0.1:9"]),
        "entrypoint": lambda: entrypoint("simulate", [str(spec)]),
    }
    for name, call in calls.items():
        assert call() == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("SimulateJob" in err[0] or "'simulate'" in err[0]), (name, err)
        assert "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_the_online_evaluation_is_in_the_spec_and_flags_override_it(tmp_path: Path) -> None:
    from mtorl.cli import _job, _with_online_flags, build_parser
    from mtorl.spec import load_job

    shipped = load_job(str(Path(__file__).resolve().parents[2] / "ray_jobs/specs/sim-evaluate.yaml"))
    assert shipped.spec.online is not None  # `mtorl submit sim-evaluate.yaml` runs the closed loop
    spec = tmp_path / "ev.yaml"
    spec.write_text("apiVersion: mtorl/v1\nkind: EvaluateJob\nmetadata: {name: e}\n"
                    "spec: {checkpoint: s3://b/ck, output: s3://b/rep, online: {users: 50}}\n")

    def job(*flags: str):  # type: ignore[no-untyped-def]
        args = build_parser().parse_args(["evaluate", str(spec), *flags])
        return _with_online_flags(args, _job(args, "EvaluateJob", lambda _a: None))

    assert (job().spec.online.users, job().spec.online.budget) == (50, 0.3)
    assert (job("--budget", "0.5").spec.online.users, job("--budget", "0.5").spec.online.budget) == (50, 0.5)
    spec.write_text(spec.read_text().replace(", online: {users: 50}", ""))
    assert job().spec.online is None and job("--online").spec.online.users == 2000

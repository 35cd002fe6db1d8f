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

"""`mtorl serve --for rayservice`: a trained run resolves to one pinned checkpoint in a config KubeRay can
serve, and the rendered RayService carries exactly that config (real object store, real checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_rayservice_target_pins_the_runs_best_checkpoint(tiny_checkpoint: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from mtorl.cli import main
    from mtorl.manifests import load_values, render

    run_dir = tiny_checkpoint.rsplit("/", 1)[0]
    out, result = tmp_path / "rayservice-serve.yaml", tmp_path / "result.json"
    assert main(["serve", "--checkpoint", run_dir, "--for", "rayservice", "--config-out", str(out),
                 "--result", str(result)]) == 0
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    assert app["args"]["checkpoint"] == tiny_checkpoint, "the run dir resolves to its best checkpoint, pinned"
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000, "request_timeout_s": 10.0}
    assert app["args"]["ingress"] == "proxy" and app["args"]["auth_token_env"] == "MTORL_SERVE_TOKEN"
    assert json.loads(result.read_text())["checkpoint"] == tiny_checkpoint

    # the manifests rendered with that CHECKPOINT serve the same config
    values, sources = load_values([ROOT / "cluster/kuberay/values.env"], environ={"CHECKPOINT": tiny_checkpoint})
    values = values.model_copy(update={"serve_spec": str(ROOT / values.serve_spec)})
    (doc,) = yaml.safe_load_all(render(ROOT / "cluster/kuberay/templates", values, sources)["rayservice.yaml"])
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    assert served["applications"][0]["args"]["checkpoint"] == tiny_checkpoint

    # no file named: one line, exit 2, nothing deployed
    capsys.readouterr()
    assert main(["serve", "--checkpoint", run_dir, "--for", "rayservice"]) == 2
    assert "--config-out" in capsys.readouterr().err

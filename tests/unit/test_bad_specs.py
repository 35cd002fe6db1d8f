"""Generated bad specs, run through the CLI in-process: each is refused with exit 2 and one line per problem
that names the file and the field (or the document), never a traceback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from mtorl.cli import main
from mtorl.spec.models import DECISION_NAMES, LOSS_NAMES, QUALITY_NAMES, VAL_METRICS

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "ray_jobs/specs/kuairand-train.yaml"
TUNE = ROOT / "ray_jobs/specs/kuairand-tune.yaml"
PREP = ROOT / "ray_jobs/specs/kuairand-prepare.yaml"
SERVE = ROOT / "ray_jobs/specs/kuairand-serve.yaml"
EVAL = ROOT / "ray_jobs/specs/kuairand-evaluate.yaml"
SIM = ROOT / "ray_jobs/specs/simulate.yaml"

# (spec file, --set override, the field the error must name)
OVERRIDES: list[tuple[Path, str, str]] = [
    # non-finite numbers
    *[
        (TRAIN, f"spec.{f}={v}", f"spec.{f}")
        for f in (
            "trainer.lr",
            "trainer.grad_clip",
            "objective.reward_weight",
            "objective.pref_weight",
            "trainer.weight_decay",
            "model.cql_alpha",
        )
        for v in (".inf", "-.inf", ".nan")
    ],
    (PREP, "spec.penalty=.inf", "spec.penalty"),
    (SIM, "spec.mean_steps=.nan", "spec.mean_steps"),
    (SERVE, "spec.request_timeout_s=.inf", "spec.request_timeout_s"),
    # strict integers and bounds
    *[
        (TRAIN, f"spec.trainer.{f}={v}", f"spec.trainer.{f}")
        for f in ("epochs", "workers", "batch_size", "keep_top_k")
        for v in ("true", "1e30", "2.5", "'3'", "-1", "1e9")
    ],
    (TRAIN, "spec.trainer.epochs=100001", "spec.trainer.epochs"),
    (TRAIN, "spec.trainer.workers=1025", "spec.trainer.workers"),
    (TRAIN, "spec.trainer.seed=-1", "spec.trainer.seed"),
    (TRAIN, "spec.trainer.seed=" + "9" * 20, "spec.trainer.seed"),
    (TRAIN, "spec.trainer.cpus_per_worker=0", "spec.trainer.cpus_per_worker"),
    (TRAIN, "spec.window.length=1", "spec.window.length"),
    (TRAIN, "spec.model.hidden=false", "spec.model.hidden"),
    (TUNE, "spec.max_trials=1e6", "spec.max_trials"),
    (SIM, "spec.users=1e12", "spec.users"),
    (SERVE, "spec.port=70000", "spec.port"),
    (SERVE, "spec.max_batch_size=0", "spec.max_batch_size"),
    *[(TRAIN, f"spec.decision.{f}={v}", f"spec.decision.{f}")
      for f in ("pessimism", "ensemble_pessimism", "channel_cost_weight") for v in ("-0.5", ".inf", ".nan")],
    (EVAL, "spec.decision.ensemble_pessimism=-1", "spec.decision.ensemble_pessimism"),
    # metric names that exist
    (TRAIN, "spec.trainer.metric=val/bogus", "spec.trainer.metric"),
    (TRAIN, "spec.trainer.metric=loss", "spec.trainer.metric"),
    (TRAIN, "spec.trainer.metric=test/loss", "spec.trainer.metric"),
    (TUNE, "spec.objective.metric=val/nope", "spec.objective.metric"),
    (TUNE, "spec.parameters={'objective.nope': {'min': 0, 'max': 1}}", "spec.parameters"),
    # URIs
    *[
        (TRAIN, f"spec.{f}={v}", f"spec.{f}")
        for f in ("data", "output")
        for v in ("''", "gs://b/ds", "http://x/y", "s3://", "' s3://b/x'", "hdfs://nn/x")
    ],
    (PREP, "spec.output=gs://b/ds", "spec.output"),
    (PREP, "spec.input=''", "spec.input"),
    (EVAL, "spec.checkpoint=az://c/x", "spec.checkpoint"),
    (EVAL, "spec.compare=['s3://b/a', 'gs://c/d']", "spec.compare"),
    (SERVE, "spec.checkpoint=''", "spec.checkpoint"),
    (SIM, "spec.output=ftp://h/x", "spec.output"),
    (TUNE, "spec.output=''", "spec.output"),
    (TUNE, "spec.base.data=gs://x", "spec.base.data"),
    # enums and shapes
    (TRAIN, "spec.trainer.mode=maximize", "spec.trainer.mode"),
    (TRAIN, "spec.model.name=gpt", "spec.model.name"),
    (TRAIN, "spec.trainer=[]", "spec.trainer"),
    (TRAIN, "spec.tracking.wandb=1", "spec.tracking.wandb"),
    # invalid YAML or paths in --set
    (TRAIN, "spec.trainer.lr=[1,", "--set"),
    (TRAIN, "spec.trainer.lr={a", "--set"),
    (TRAIN, "spec.trainer.lr='x", "--set"),
    (TRAIN, "spec.trainer.epochs=" + "9" * 5000, "--set"),
    (TRAIN, "novalue", "--set"),
    (TRAIN, "=3", "--set"),
]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.err


@pytest.mark.parametrize("spec,override,field", OVERRIDES, ids=[f"{p.stem}:{o[:40]}" for p, o, _ in OVERRIDES])
def test_bad_override_is_one_line_naming_file_and_field(
    capsys: pytest.CaptureFixture[str], spec: Path, override: str, field: str
) -> None:
    code, err = _run(capsys, "validate", str(spec), "--set", override)
    lines = err.strip().splitlines()
    assert code == 2 and lines, err
    assert all(ln.startswith(f"{spec}: ") for ln in lines), err
    assert any(f": {field}" in ln for ln in lines), err


def _text() -> str:
    return TRAIN.read_text()


def _sub(old: str, new: str) -> str:
    """The shipped spec with one edit; an edit that no longer applies (the spec changed) fails loudly."""
    text = _text()
    assert old in text, f"{TRAIN.name} no longer contains {old!r}: update the bad-spec case"
    return text.replace(old, new)


FILES: list[tuple[str, bytes, str]] = [
    ("duplicate-top", (_text() + "\nkind: TrainJob\n").encode(), "duplicate key 'kind'"),
    (
        "duplicate-nested",
        _sub("    epochs: 8\n", "    epochs: 8\n    epochs: 9\n").encode(),
        "duplicate key 'epochs'",
    ),
    ("utf16", _text().encode("utf-16"), "UTF-16"),
    ("utf16-be", b"\xfe\xff" + _text().encode("utf-16-be"), "UTF-16"),
    ("binary", bytes(range(256)) * 4, "binary"),
    ("latin1", (_text() + "# caf\xe9\n").encode("latin-1"), "not UTF-8"),
    ("huge-int", _sub("epochs: 8", "epochs: " + "7" * 5000).encode(), "5000 digits"),
    ("tabs", b"spec:\n\t- x\n", "not valid YAML"),
    ("unclosed", b"spec: {a: [1, 2\n", "not valid YAML"),
    ("list-doc", b"- 1\n- 2\n", "YAML mapping"),
    ("scalar-doc", b"hello\n", "YAML mapping"),
    ("empty", b"", "YAML mapping"),
    ("two-docs", _text().encode() + b"\n---\n" + _text().encode(), "not valid YAML"),
    ("python-tag", b"!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("deep", b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "YAML"),
    ("inf-lr", _sub("lr: 0.003", "lr: .inf").encode(), "spec.trainer.lr"),
    ("epochs-true", _sub("epochs: 8", "epochs: true").encode(), "spec.trainer.epochs"),
    ("epochs-1e30", _sub("epochs: 8", "epochs: 1e30").encode(), "spec.trainer.epochs"),
    ("data-empty", _sub("data: s3://mtorl/datasets/kuairand", "data: ''").encode(), "spec.data"),
    ("metric-bogus", _sub("metric: val/select_rate@budget", "metric: val/bogus").encode(), "spec.trainer.metric"),
    ("unknown-kind", _sub("kind: TrainJob", "kind: FooJob").encode(), "unknown kind"),
    ("unknown-field", _sub("    epochs: 8\n", "    epochz: 8\n").encode(), "spec.trainer.epochz"),
]


@pytest.mark.parametrize("name,data,needle", FILES, ids=[f[0] for f in FILES])
def test_bad_spec_file_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, data: bytes, needle: str
) -> None:
    f = tmp_path / f"{name}.yaml"
    f.write_bytes(data)
    code, err = _run(capsys, "validate", str(f))
    lines = err.strip().splitlines()
    assert code == 2 and lines and all(ln.startswith(f"{f}: ") for ln in lines), err
    assert needle in err, err
    code, err = _run(capsys, "train", str(f))  # the commands that run a spec behave the same
    assert code == 2 and needle in err, err


def test_missing_and_unreadable_spec_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = _run(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2 and f"{tmp_path / 'nope.yaml'}: <document>: cannot read" in err
    code, err = _run(capsys, "validate", str(tmp_path))
    assert code == 2 and err.startswith(f"{tmp_path}: <document>: cannot read")


def test_good_spec_still_parses_yaml12_floats(tmp_path: Path) -> None:
    from mtorl.spec import load_job

    f = tmp_path / "ok.yaml"
    f.write_text(_sub("lr: 0.003", "lr: 3e-3"))
    assert load_job(f).spec.trainer.lr == pytest.approx(3e-3)
    assert load_job(TRAIN, ["spec.trainer.lr=1e-4"]).spec.trainer.lr == pytest.approx(1e-4)


def test_val_metric_names_come_from_the_training_code() -> None:
    """VAL_METRICS lists exactly what training reports: the loss keys of compute_loss and val_metrics' keys."""
    import numpy as np

    from mtorl.training.step import val_metrics

    src = (ROOT / "mtorl/training/losses.py").read_text()
    reported = set(re.findall(r'"(\w*loss)"', src)) | set(re.findall(r"(\w+_loss)=", src))
    assert reported == set(LOSS_NAMES), reported ^ set(LOSS_NAMES)
    ch = np.array([0, 1, 2, 1])
    probs = np.eye(3)[[0, 1, 1, 2]] * 0.8 + 0.05
    keys = set(val_metrics(ch, probs, np.array([0.0, 1.0, 1.0, 0.0]), np.array([0.2, 0.7, 0.6, 0.1]), True))
    keys |= set(val_metrics(ch, probs, np.array([0.1, 0.5, 0.9, 0.3]), np.array([0.2, 0.4, 0.8, 0.1]), False))
    assert keys == set(QUALITY_NAMES)
    from mtorl.spec.models import DecisionSpec
    from mtorl.training.step import decision_val_metrics

    r = np.array([0.0, 1.0, 1.0, 0.0])
    dkeys = set(
        decision_val_metrics(
            ch,
            probs,
            r,
            np.tile([[0.2], [0.7], [0.6], [0.1]], (1, 3)),
            np.ones(4),
            np.full(4, 1 / 3),
            True,
            DecisionSpec(),
        )
    )
    assert dkeys == set(DECISION_NAMES), dkeys ^ set(DECISION_NAMES)
    assert len(VAL_METRICS) == len(set(VAL_METRICS))


def test_unexpected_error_is_one_line_with_a_debug_hint(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtorl.cli as cli

    def boom(args: Any) -> int:
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(cli, "cmd_explain", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _patched(parser(), boom))
    code = cli.main(["explain", "TrainJob"])
    err = capsys.readouterr().err
    assert (
        code == 1 and err.strip() == "error: ZeroDivisionError: boom (unexpected; rerun with --debug for the traceback)"
    )
    with pytest.raises(ZeroDivisionError):
        cli.main(["explain", "TrainJob", "--debug"])


def _patched(p: Any, fn: Any) -> Any:
    for action in p._subparsers._group_actions:
        for sub in action.choices.values():
            if sub.get_default("fn") is not None and sub.prog.endswith("explain"):
                sub.set_defaults(fn=fn)
    return p


def test_a_known_error_wrapped_by_ray_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mtorl.cli as cli
    from mtorl.data.errors import DataError

    class WorkerGroupError(Exception):  # the shape of Ray Train's: failures per rank
        def __init__(self) -> None:
            super().__init__("Training failed: 300 lines")
            self.worker_failures = {0: DataError("s3://b/ds/train/part-0.parquet: sha256 mismatch")}

    def boom(args: Any) -> int:
        try:
            raise WorkerGroupError()
        except WorkerGroupError as e:
            raise RuntimeError("TrainingFailedError") from e

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _patched(parser(), boom))
    assert cli.main(["explain", "TrainJob"]) == 2
    assert capsys.readouterr().err == "error: s3://b/ds/train/part-0.parquet: sha256 mismatch\n"


def test_validate_and_the_error_base_import_neither_torch_nor_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from mtorl.cli import main; import mtorl.errors, mtorl.data.errors, mtorl.storage.errors; "
        f"rc = main(['validate', {str(TRAIN)!r}, '--set', 'spec.trainer.epochs=true']); "
        "print(rc, 'torch' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr


def test_a_known_error_inside_a_ray_data_task_survives_as_text() -> None:
    """Ray Data re-raises a UDF's error as UserCodeException; the cause is only in the traceback text."""
    from mtorl.data.errors import DataError
    from mtorl.errors import find_known

    text = (
        'ray::MapBatches(load)() (pid=1, ip=x)\n  File "pipeline.py", line 9, in load\n'
        "mtorl.data.errors.DataError: s3://b/ds/v1/train/part-00000.parquet: sha256 mismatch (shard altered)\n"
    )
    known = find_known(RuntimeError(text))
    assert (
        isinstance(known, DataError)
        and str(known) == "s3://b/ds/v1/train/part-00000.parquet: sha256 mismatch (shard altered)"
    )
    assert find_known(RuntimeError("os.error: nope")) is None

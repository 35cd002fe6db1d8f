"""Ensemble checkpoints (`mtorl ensemble`): an ensemble of one predicts what its member does, the
prediction of K is the members' mean, serving decides on the members' spread, `--decision` sets the
ensemble's decision block (members untouched), and a member that can't join, a bad override (or a
malformed ensemble) is one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mtorl.cli import main as cli_main
from mtorl.models import build_model
from mtorl.evaluation.allocation import allocate_requests
from mtorl.evaluation.decision import decide, params_of
from mtorl.models.ensemble import Ensemble, predict_spread
from mtorl.serving.predictor import Predictor
from mtorl.serving.schemas import Limits, allocation, recommend_scores, recommendations
from mtorl.serving.service import Service
from mtorl.sim.benchmark import overrides_note
from mtorl.spec import DecisionSpec, ModelSpec, SpecError
from mtorl.training.checkpoint import BEST_FILE, CheckpointError, load_checkpoint, write_checkpoint_dir
from mtorl.training.ensemble import ENSEMBLE_DIR, combine_runs
from tests.fixtures.checkpoints import MANIFEST, MODEL, model_args, untrained_run

ARGS = model_args(MANIFEST)


def _inputs(B: int = 5, T: int = 7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(3)
    return (g.normal(size=(B, T, 2)).astype(np.float32), g.integers(-1, 2, size=(B, T)),
            g.random((B, T)).astype(np.float32))


def test_ensemble_of_one_predicts_what_its_member_does(tmp_path: Path) -> None:
    member = untrained_run(tmp_path, "a", 0)
    ens = combine_runs([member], str(tmp_path / "ens1"), progress=lambda m: None)
    assert ens == str(tmp_path / "ens1" / ENSEMBLE_DIR)
    p_ens, p_one = Predictor.from_checkpoint(str(tmp_path / "ens1")), Predictor.from_checkpoint(member)
    assert isinstance(p_ens.model, Ensemble) and len(p_ens.model) == 1 and p_ens.ensemble_size == 1
    a_e, r_e = p_ens.predict_last(*_inputs())
    a_1, r_1 = p_one.predict_last(*_inputs())
    np.testing.assert_array_equal(a_e, a_1)
    np.testing.assert_array_equal(r_e, r_1)


def test_ensemble_predicts_the_members_mean_and_spread(tmp_path: Path) -> None:
    runs = [untrained_run(tmp_path, f"s{k}", k) for k in range(3)]
    combine_runs(runs, str(tmp_path / "ens"), progress=lambda m: None)
    p = Predictor.from_checkpoint(str(tmp_path / "ens"))
    meta = p.meta.ensemble
    assert meta is not None and [m.seed for m in meta.members] == [0, 1, 2] and p.name == "mtorl"
    assert [m.checkpoint for m in meta.members] == [load_checkpoint(r).uri for r in runs]
    outs = [Predictor.from_checkpoint(r).predict_last(*_inputs()) for r in runs]
    probs, reward = p.predict_last(*_inputs())
    np.testing.assert_allclose(probs, np.mean([o[0] for o in outs], axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(reward, np.mean([o[1] for o in outs], axis=0), rtol=1e-6, atol=1e-7)
    assert not np.allclose(outs[0][1], outs[1][1])  # the members do differ: the mean is not trivially one of them
    # the members' spread: population std of the reward heads, zeros for a single model
    from mtorl.models import Batch

    s, c, r = _inputs()
    batch = Batch.from_numpy({"state": s, "prev_channel": c.astype(np.int64), "prev_reward": r,
                              "mask": np.ones(c.shape, dtype=bool)})
    _, _, sd = predict_spread(p.model, batch)
    np.testing.assert_allclose(sd[:, -1].numpy(), np.std([o[1] for o in outs], axis=0), rtol=1e-5, atol=1e-6)
    one = Predictor.from_checkpoint(runs[0]).model
    assert torch.count_nonzero(predict_spread(one, batch)[2]) == 0


def _request_users(n: int = 24) -> list[dict[str, Any]]:
    """``n`` request users of 1-4 steps for MANIFEST (channels search/video, features x, y)."""
    g = np.random.default_rng(0)
    step = lambda: {"channel": MANIFEST["channels"][int(g.integers(2))], "gain": float(g.integers(2)),  # noqa: E731
                    "cost": float(1 + g.integers(3)), "features": {"x": float(g.normal()), "y": float(g.normal())}}
    return [{"user_id": f"u{i}", "journey": [step() for _ in range(1 + i % 4)]} for i in range(n)]


def _answers(svc: Service, users: list[dict[str, Any]], beta_e: float) -> list[bytes]:
    """/v1/recommend and /v1/allocate (budget 8) bodies for ``users``, in one batch, at ensemble pessimism beta_e."""
    svc.decision = svc.decision.model_copy(update={"ensemble_pessimism": beta_e})
    jobs = [svc.parse("recommend", json.dumps({"users": users}).encode()),
            svc.parse("allocate", json.dumps({"users": users, "budget": 8.0}).encode())]
    out = svc.run_batch(jobs)
    assert all(isinstance(a, bytes) for a in out), out
    return [a for a in out if isinstance(a, bytes)]


def test_served_ensemble_decides_on_the_members_spread(tmp_path: Path) -> None:
    """The Predictor's outputs carry the members' population std of r_hat (here computed from each member's own
    prediction); /v1/recommend and /v1/allocate score r_hat - beta_e * sd. At beta_e = 0, and for a single model at
    any beta_e, the answers are those of the decision layer without a spread."""
    dec = {"support_threshold": 0.0, "ensemble_pessimism": 2.0}
    runs = [untrained_run(tmp_path, f"s{k}", k, decision=dec) for k in range(2)]
    combine_runs(runs, str(tmp_path / "ens"), progress=lambda m: None)
    ens, members = Predictor.from_checkpoint(str(tmp_path / "ens")), [Predictor.from_checkpoint(r) for r in runs]
    svc = Service(ens, Limits(), 1_000_000)
    assert svc.decision.ensemble_pessimism == 2.0           # the checkpoint's decision: block
    users = _request_users()
    p = svc.parse("recommend", json.dumps({"users": users}).encode()).prepared

    # the spread, per step (offline evaluation) and at the next step (serving): |r_0 - r_1| / 2 for two members
    per_step = [m.predict_journeys(p.journeys) for m in members]
    for b, pr in enumerate(ens.predict_journeys(p.journeys)):
        r0, r1 = per_step[0][b].reward, per_step[1][b].reward
        assert pr.reward_std is not None and per_step[0][b].reward_std is None
        np.testing.assert_allclose(pr.reward_std, np.abs(r0 - r1) / 2, rtol=1e-5, atol=1e-7)
    probs, reward, sd = ens.predict_next(p.journeys, p.next_states)
    own = [m.predict_next(p.journeys, p.next_states) for m in members]
    assert own[0][2] is None and own[1][2] is None          # a single model: no spread, no extra work
    assert sd is not None
    np.testing.assert_allclose(sd, np.std([own[0][1], own[1][1]], axis=0), rtol=1e-5, atol=1e-7)
    assert sd.max() > 0.01

    # beta_e = 2: the decision layer on r_hat - 2 sd
    rec, alloc = (json.loads(a) for a in _answers(svc, users, 2.0))
    d = decide(reward, probs, p.costs, svc.decision, penalty=0.0, reward_std=sd)
    assert [u["recommended_channel"] for u in rec["users"]] == [MANIFEST["channels"][c] for c in d.channel]
    ref = allocate_requests([(u, reward[b], probs[b], p.costs[b]) for b, u in enumerate(p.user_ids)], 8.0,
                            decision=svc.decision, reward_std=sd)
    assert [s["user_id"] for s in alloc["selected"]] == [s["user_id"] for s in ref["selected"]]
    assert alloc["penalty"] == ref["penalty"]
    # beta_e = 0: today's answers, without the spread (and beta_e changed some)
    at0 = _answers(svc, users, 0.0)
    today = svc.decision
    best, kb = recommend_scores(probs, reward, p.costs, today)
    assert json.loads(at0[0])["users"] == json.loads(json.dumps(recommendations(p, probs, reward, ens.channels,
                                                                                scored=(best, kb))))
    want = allocation(p, probs, reward, ens.channels, 8.0, None, today)
    assert {k: v for k, v in json.loads(at0[1]).items() if k != "model_version"} == json.loads(json.dumps(want))
    assert json.loads(at0[0]) != rec and json.loads(at0[1]) != alloc
    # a single model: the same bytes at every beta_e
    one = Service(members[0], Limits(), 1_000_000)
    assert _answers(one, users, 2.0) == _answers(one, users, 0.0)


@pytest.mark.parametrize("bad, match", [
    ("spec", r"^member 1 \(.*b/checkpoint_epoch_000000\): model spec differs from member 0's"),
    ("data", r"^member 1 \(.*\): trained on another dataset than member 0"),
    ("same", r"^member 1 \(.*\): the same checkpoint as member 0$"),
    ("weights", r"^.*b/checkpoint_epoch_000000/model.safetensors: checksum mismatch"),
])
def test_a_member_that_cannot_join_is_one_line(tmp_path: Path, bad: str, match: str) -> None:
    a = untrained_run(tmp_path, "a", 0)
    b = {"spec": lambda: untrained_run(tmp_path, "b", 1, model={**MODEL, "hidden": 16}),
         "data": lambda: untrained_run(tmp_path, "b", 1, sha="data-v2"),
         "same": lambda: a}[bad]() if bad != "weights" else untrained_run(tmp_path, "b", 1)
    if bad == "weights":
        f = Path(b) / "checkpoint_epoch_000000" / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(CheckpointError, match=match):
        combine_runs([a, b], str(tmp_path / "ens"), progress=lambda m: None)
    assert not (tmp_path / "ens" / BEST_FILE).exists()


def test_malformed_ensemble_checkpoint_is_one_line(tmp_path: Path) -> None:
    """meta.json lists three members, the weights hold two: refused on load, naming the file."""
    nets = [build_model(ModelSpec.model_validate(MODEL), **ARGS) for _ in range(2)]
    member = {"checkpoint": "x", "model_sha256": "0", "seed": 0}
    d = write_checkpoint_dir(tmp_path / "ck", Ensemble(nets), None, {
        "spec": {"kind": "TrainJob", "spec": {"model": MODEL}}, "model_args": ARGS, "manifest": MANIFEST,
        "ensemble": {"members": [member] * 3}})
    with pytest.raises(CheckpointError, match=rf"^{d}/model.safetensors: weights do not fit an ensemble of 3 \("):
        Predictor.from_checkpoint(str(d))


def test_cli_rerun_is_a_noop_and_another_run_is_refused_in_one_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a, b = untrained_run(tmp_path, "a", 0), untrained_run(tmp_path, "b", 1)
    assert cli_main(["ensemble", a, b, "--out", str(tmp_path / "ens")]) == 0
    first = (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["ensemble", a, b, "--out", str(tmp_path / "ens")]) == 0       # the same members: nothing to do
    assert (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns == first
    capsys.readouterr()
    assert cli_main(["ensemble", a, "--out", str(tmp_path / "ens")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'ens'}: already holds another run ({BEST_FILE}); choose another --out"]


def test_decision_overrides_land_in_the_ensembles_decision_block(tmp_path: Path) -> None:
    """`--decision` sets fields over member 0's decision: block in the ensemble's spec, which evaluation and
    serving read (``DecisionSpec.of_job``); the overridden fields are listed in the ensemble block, and the
    members' own checkpoints are untouched."""
    runs = [untrained_run(tmp_path, "a", 0, decision={"support_threshold": 0.0, "budget": 0.3}),
            untrained_run(tmp_path, "b", 1, decision={"support_threshold": 0.2})]
    member_meta = [(Path(load_checkpoint(r).uri) / "meta.json").read_bytes() for r in runs]
    combine_runs(runs, str(tmp_path / "ens"), progress=lambda m: None,
                 decision={"ensemble_pessimism": 1, "channel_cost_weight": 0.6})
    ens = Predictor.from_checkpoint(str(tmp_path / "ens"))
    params = params_of(DecisionSpec.of_job(ens.meta.spec))                  # what evaluate and the closed loop use
    assert params.ensemble_pessimism == 1.0 and params.channel_cost_weight == 0.6
    assert params.support_threshold == 0.0 and params.policy == "reward"    # member 0's, kept
    assert Service(ens, Limits(), 1_000_000).decision == DecisionSpec(support_threshold=0.0, budget=0.3,
                                                                      ensemble_pessimism=1.0, channel_cost_weight=0.6)
    assert ens.meta.spec["spec"]["decision"] == {"support_threshold": 0.0, "budget": 0.3, "ensemble_pessimism": 1.0,
                                                 "channel_cost_weight": 0.6}
    assert ens.meta.ensemble is not None
    assert ens.meta.ensemble.decision_overrides == {"ensemble_pessimism": 1.0, "channel_cost_weight": 0.6}
    assert [(Path(load_checkpoint(r).uri) / "meta.json").read_bytes() for r in runs] == member_meta
    assert load_checkpoint(runs[0]).meta.spec["spec"]["decision"] == {"support_threshold": 0.0, "budget": 0.3}
    assert overrides_note(ens.meta.ensemble.decision_overrides) == (
        " (set on the ensemble by `mtorl ensemble --decision`: ensemble_pessimism = 1, channel_cost_weight = 0.6)")


def test_without_overrides_the_decision_block_is_member_0s(tmp_path: Path) -> None:
    runs = [untrained_run(tmp_path, "a", 0, decision={"support_threshold": 0.0, "pessimism": 0.5}),
            untrained_run(tmp_path, "b", 1, decision={"ensemble_pessimism": 3.0})]
    combine_runs(runs, str(tmp_path / "ens"), progress=lambda m: None)
    ens = load_checkpoint(str(tmp_path / "ens")).meta
    assert ens.spec == load_checkpoint(runs[0]).meta.spec
    assert ens.ensemble is not None and ens.ensemble.decision_overrides == {}
    assert DecisionSpec.of_job(ens.spec) == DecisionSpec(support_threshold=0.0, pessimism=0.5)
    assert overrides_note(ens.ensemble.decision_overrides) == ""


@pytest.mark.parametrize("item, line", [
    ("ensemble_pessimsm=1", "--decision: decision.ensemble_pessimsm: Extra inputs are not permitted (got 1)"),
    ("channel_cost_weight=-0.5",
     "--decision: decision.channel_cost_weight: Input should be greater than or equal to 0 (got -0.5)"),
    ("ensemble_pessimism",
     "--decision: decision: 'ensemble_pessimism' must look like KEY=VALUE, e.g. ensemble_pessimism=1"),
])
def test_cli_bad_decision_override_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                   item: str, line: str) -> None:
    a, b = untrained_run(tmp_path, "a", 0), untrained_run(tmp_path, "b", 1)
    capsys.readouterr()
    code = cli_main(["ensemble", a, b, "--out", str(tmp_path / "ens"), "--decision", "ensemble_pessimism=1",
                     "--decision", item])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert not (tmp_path / "ens").exists()
    with pytest.raises(SpecError, match=r"^--decision: decision\."):     # the library refuses it the same way
        combine_runs([a, b], str(tmp_path / "ens"), progress=lambda m: None, decision={"fill": "no"})
    assert not (tmp_path / "ens").exists()


def test_cli_decision_overrides_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The flags land in the ensemble's decision block; a re-run with the same flags is a no-op, with other
    flags (or none) it is refused in one line rather than leaving the ensemble acting by other settings."""
    a, b = untrained_run(tmp_path, "a", 0), untrained_run(tmp_path, "b", 1)
    flags = ["--decision", "ensemble_pessimism=1", "--decision", "channel_cost_weight=0.6"]
    out = str(tmp_path / "ens")
    assert cli_main(["ensemble", a, b, "--out", out, *flags]) == 0
    dec = Service(Predictor.from_checkpoint(out), Limits(), 1_000_000).decision  # what /v1/recommend acts by
    assert (dec.ensemble_pessimism, dec.channel_cost_weight) == (1.0, 0.6)
    first = (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns
    assert cli_main(["ensemble", a, b, "--out", out, *flags]) == 0
    assert (tmp_path / "ens" / ENSEMBLE_DIR / "model.safetensors").stat().st_mtime_ns == first
    capsys.readouterr()
    assert cli_main(["ensemble", a, b, "--out", out]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {out}: already holds this ensemble with decision overrides {{'ensemble_pessimism': 1.0, "
        "'channel_cost_weight': 0.6}, not none; choose another --out"]

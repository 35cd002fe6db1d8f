"""``mtorl ensemble``: finished runs of one spec (different training seeds) -> one ensemble checkpoint.

    mtorl ensemble s3://mtorl/runs/sim20k s3://mtorl/runs/sim20k-s1 s3://mtorl/runs/sim20k-s2 \\
        --out s3://mtorl/runs/sim20k-ens3 [--decision ensemble_pessimism=1 --decision channel_cost_weight=0.6]

Each member is loaded as weights only and verified like any checkpoint (a run resolves to its best
checkpoint). The members must share the model spec, the sizes (model_args) and the dataset
(manifest sha256); anything else is refused in one line naming the member. The output run holds one
checkpoint ``checkpoint_ensemble`` (weights ``members.<k>.*`` in one safetensors file, the first
member's job document, the members listed in meta.json's typed ``ensemble`` block) and its
``best.json``, written last: a reader never sees a half-written ensemble as the run's checkpoint.
Re-running with the same members (and decision overrides) is a no-op; another run already at ``--out``
is refused. ``Predictor`` loads it like any checkpoint, so evaluate, serve and the simulator use it unchanged.

``--decision KEY=VALUE`` (``decision=`` here) sets fields of the ensemble's ``decision:`` block, the one
evaluation and serving act by (``ensemble_pessimism`` means nothing to a single member): validated as a
spec's ``DecisionSpec``, merged over member 0's block and listed in the ``ensemble`` block's
``decision_overrides``. The members' own checkpoints are untouched.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Mapping, Sequence

from mtorl import storage
from mtorl.models import build_model
from mtorl.models.ensemble import Ensemble
from mtorl.spec import DecisionSpec, ModelSpec
from mtorl.spec.loader import validate_part
from mtorl.training.checkpoint import (BEST_FILE, MODEL_FILE, CheckpointError, LoadedCheckpoint, load_checkpoint,
                                       resolve_checkpoint_uri, write_checkpoint_dir)

ENSEMBLE_DIR = "checkpoint_ensemble"
DECISION_SOURCE = "--decision"  # names the overrides in a SpecError line: `--decision: decision.KEY: REASON`


def _model_spec(ck: LoadedCheckpoint) -> dict[str, Any]:
    try:
        return dict(ck.meta.spec["spec"]["model"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{ck.uri}/meta.json: spec has no spec.model: not a trained model's checkpoint") from None


def check_members(members: Sequence[LoadedCheckpoint]) -> None:
    """One ``CheckpointError`` line naming the first member that can't join member 0."""
    if not members:
        raise CheckpointError("an ensemble needs at least one member")
    first = members[0]
    seen: dict[str, int] = {}
    for k, m in enumerate(members):
        where = f"member {k} ({m.uri})"
        if m.uri in seen:
            raise CheckpointError(f"{where}: the same checkpoint as member {seen[m.uri]}")
        seen[m.uri] = k
        if m.meta.ensemble is not None:
            raise CheckpointError(f"{where}: is itself an ensemble; list its members instead")
        if m.meta.model_args is None:
            raise CheckpointError(f"{where}: meta.json lacks model_args: not a trained model's checkpoint")
        if m.meta.model_args != first.meta.model_args:
            raise CheckpointError(f"{where}: model_args {m.meta.model_args.model_dump()} differ from member 0's "
                                  f"{first.meta.model_args.model_dump() if first.meta.model_args else None}")
        if _model_spec(m) != _model_spec(first):
            raise CheckpointError(f"{where}: model spec differs from member 0's (members may differ in their seed only)")
        if (m.meta.manifest_sha256 or m.manifest.version) != (first.meta.manifest_sha256 or first.manifest.version):
            raise CheckpointError(f"{where}: trained on another dataset than member 0 "
                                  f"(manifest {m.meta.manifest_sha256} vs {first.meta.manifest_sha256})")


def build_ensemble(members: Sequence[LoadedCheckpoint]) -> Ensemble:
    """The members' networks, weights loaded, as one :class:`Ensemble` (checked first)."""
    check_members(members)
    nets = []
    spec = ModelSpec.model_validate(_model_spec(members[0]))
    for k, m in enumerate(members):
        args = m.meta.model_args
        assert args is not None  # check_members
        net = build_model(spec, state_dim=args.state_dim, n_channels=args.n_channels, binary=args.binary)
        try:
            net.load_state_dict(m.state_dict)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(f"member {k} ({m.uri})/{MODEL_FILE}: weights do not fit its model spec ({first})") from None
        nets.append(net)
    return Ensemble(nets)


def with_decision(job: Mapping[str, Any], decision: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Member 0's job document with ``decision`` set over its ``decision:`` block -> (that document, the
    overridden fields as validated: ``{"ensemble_pessimism": 1.0}``). The merged block is validated as
    ``DecisionSpec`` (a SpecError naming ``decision.<key>``); ``job`` itself is not changed."""
    out = copy.deepcopy(dict(job))
    inner = out["spec"]  # a trained model's job document (check_members: it has spec.model)
    base = dict(inner.get("decision") or {})
    merged = validate_part(DecisionSpec, {**base, **decision}, "decision", DECISION_SOURCE)
    overrides = merged.model_dump(mode="json", include=set(decision))
    inner["decision"] = {**base, **overrides}
    return out, overrides


def ensemble_meta(members: Sequence[LoadedCheckpoint], decision: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """meta.json fields of the ensemble checkpoint (``write_checkpoint_dir`` adds version and digests):
    member 0's job document, with ``decision`` (fields of ``DecisionSpec``) over its ``decision:`` block."""
    first = members[0].meta
    spec, overrides = with_decision(first.spec, decision) if decision else (first.spec, {})
    listed = []
    for m in members:
        trainer = (m.meta.spec.get("spec") or {}).get("trainer") or {}
        listed.append({"checkpoint": m.uri, "model_sha256": m.meta.sha256.get(MODEL_FILE, ""),
                       "seed": trainer.get("seed"), "epoch": m.meta.epoch,
                       "metrics": {k: v for k, v in m.meta.metrics.items() if isinstance(v, (int, float))}})
    return {"spec": spec, "model_args": first.model_args, "manifest": first.manifest,
            "manifest_uri": first.manifest_uri, "manifest_sha256": first.manifest_sha256,
            "epoch": max(m.meta.epoch for m in members), "step": sum(m.meta.step for m in members),
            "ensemble": {"members": listed, "combine": "mean", "decision_overrides": overrides}}


def combine_runs(member_uris: Sequence[str], out_run: str, progress: Any = print,
                 decision: Mapping[str, Any] | None = None) -> str:
    """Write the ensemble of ``member_uris`` (runs or checkpoints) as the run ``out_run``; its checkpoint URI.
    ``decision``: fields of ``DecisionSpec`` set over member 0's ``decision:`` block in the ensemble's spec
    (``{"ensemble_pessimism": 1, "channel_cost_weight": 0.6}``); a bad one is a SpecError before anything is read
    or written."""
    decision = dict(decision or {})
    if decision:
        validate_part(DecisionSpec, decision, "decision", DECISION_SOURCE)  # alone first: fails before any I/O
    uris = [resolve_checkpoint_uri(u) for u in member_uris]
    out_run = out_run.rstrip("/")
    for u in uris:
        if u == out_run or u.startswith(out_run + "/"):
            raise CheckpointError(f"{u}: a member lies inside the output run {out_run}")
    members = [load_checkpoint(u) for u in uris]
    model = build_ensemble(members)
    meta = ensemble_meta(members, decision)
    overrides = meta["ensemble"]["decision_overrides"]
    target = storage.join(out_run, ENSEMBLE_DIR)
    if storage.exists(storage.join(out_run, BEST_FILE)):
        done = load_checkpoint(out_run).meta.ensemble
        want = [(m.uri, m.meta.sha256.get(MODEL_FILE, "")) for m in members]
        if done is not None and [(m.checkpoint, m.model_sha256) for m in done.members] == want:
            if done.decision_overrides != overrides:
                raise CheckpointError(f"{out_run}: already holds this ensemble with decision overrides "
                                      f"{done.decision_overrides or 'none'}, not {overrides or 'none'}; choose another --out")
            progress(f"{out_run} already holds this ensemble of {len(members)} members: nothing to do")
            return target  # a re-run (scripts/online.sh) is a no-op, as a finished `mtorl train` is
        raise CheckpointError(f"{out_run}: already holds another run ({BEST_FILE}); choose another --out")
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint_dir(tmp, model, None, meta)
        if storage.exists(target):  # left by an interrupted earlier call: no best.json names it
            storage.delete_prefix(target)
        storage.upload_dir(tmp, target)
    load_checkpoint(target)  # read back and verified before the pointer names it
    storage.write_json(storage.join(out_run, BEST_FILE), {"checkpoint": target, "metric": None, "value": None})
    set_ = "".join(f", decision.{k} = {v}" for k, v in overrides.items())
    progress(f"ensemble of {len(members)} members{set_} -> {target} (best.json of {out_run} names it)")
    return target

"""Typed job specs (Kubeflow-style): ``apiVersion: mtorl/v1``, ``kind``, ``metadata``, ``spec``.

Every model forbids unknown fields and is frozen; field descriptions are the documentation
(``mtorl explain KIND`` prints them). Secrets are never stored in specs: fields ending in
``_env`` name an environment variable that holds the secret.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Mapping, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

API_VERSION: Literal["mtorl/v1"] = "mtorl/v1"

# The metrics a training run reports on the validation split (mtorl.training.step: the losses of
# compute_loss, then val_metrics). The one list trainer.metric and a sweep's objective are checked
# against; tests/unit/test_spec_domain.py checks that the training code reports exactly these.
LOSS_NAMES = ("loss", "reward_loss", "pref_loss", "action_loss", "q_loss", "td_loss", "cql_loss", "v_loss",
              "awr_loss", "imitation_loss")
QUALITY_NAMES = ("accuracy", "macro_f1", "mean_auc", "reward_auc", "reward_mse")
# decision metrics (mtorl.evaluation.decision.decision_metrics, reported through training.step.decision_val_metrics)
DECISION_NAMES = ("select_rate@budget", "decision_penalty", "decision_dr", "decision_dr@budget")
VAL_METRICS = tuple(f"val/{n}" for n in LOSS_NAMES + QUALITY_NAMES + DECISION_NAMES)

_URI_SCHEMES = ("s3://", "file://")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _uri(v: str) -> str:
    """A non-empty ``s3://bucket/...``, ``file://...`` or local path; any other scheme is refused
    (``gs://b/x`` must not become a local folder named ``gs:``)."""
    if not v.strip():
        raise ValueError("must not be empty (an s3://bucket/prefix URI or a local path)")
    if v != v.strip() or any(c in v for c in "\x00\n\r"):
        raise ValueError("must not have surrounding spaces, newlines or NUL bytes")
    low = v.lower()
    if low.startswith("s3://"):
        if not low[5:].split("/", 1)[0]:
            raise ValueError(f"{v!r} has no bucket (s3://bucket/prefix)")
        return v
    if low.startswith("file://"):
        return v
    m = _SCHEME.match(v)
    if m and not re.match(r"^[A-Za-z]:[\\/]", v):  # (a Windows drive letter is a path)
        raise ValueError(f"unsupported URI scheme {m.group(0)!r} in {v!r}: use s3://bucket/prefix or a local path")
    return v


Uri = Annotated[str, AfterValidator(_uri)]


def _val_metric(v: str) -> str:
    if v not in VAL_METRICS:
        raise ValueError(f"unknown metric {v!r}; one of {', '.join(VAL_METRICS)}")
    return v


ValMetric = Annotated[str, AfterValidator(_val_metric)]

Source = Literal["kuairand-sequence", "criteo-sequence", "criteo-attribution", "journeys"]
ModelName = Literal["mtorl", "bc_mlp", "bc_seq", "cql", "iql", "bcq", "dt", "logreg"]


class _Strict(BaseModel):
    # strict: no bool/float/str -> int coercion (``epochs: true`` or ``1e30`` is refused); finite numbers only
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True, allow_inf_nan=False)


class Metadata(_Strict):
    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$", description="Job name (DNS-1123 label); also the run name, so re-running resumes.")
    labels: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")


class RunPolicy(_Strict):
    """Kubeflow-style run policy honoured by ``mtorl submit``."""

    retries: int = Field(0, ge=0, le=20, description="Resubmissions after a failed attempt.")
    active_deadline_seconds: int | None = Field(None, alias="activeDeadlineSeconds", gt=0, description="Stop the job after this many seconds.")


# ----------------------------------------------------------------------------- data

class SplitSpec(_Strict):
    train: float = Field(0.8, gt=0, lt=1, description="Fraction of users in train.")
    val: float = Field(0.1, ge=0, lt=1, description="Fraction of users in val.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of users in test.")
    salt: str = Field("mtorl", description="Salt of the stable user-id hash that assigns splits.")

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitSpec":
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        return self


class JourneysFormat(_Strict):
    """Columns of the generic ``journeys`` source (Parquet or CSV)."""

    user_col: str = "user_id"
    time_col: str = "timestamp"
    channel_col: str = "channel"
    gain_col: str = "gain"
    cost_col: str = "cost"
    propensity_col: str | None = Field(None, description="Logging policy probability of the logged channel, if logged.")
    numeric_features: list[str] = Field(default_factory=list, description="Per-step numeric feature columns (q_t).")
    categorical_features: list[str] = Field(default_factory=list, description="Per-step categorical columns, one-hot encoded with a vocabulary fitted on train.")
    user_features: list[str] = Field(default_factory=list, description="Static numeric user features (f); the first value per user is used.")


class PrepareSpec(_Strict):
    source: Source = Field(description="Converter to use.")
    input: Uri = Field(description="Input file: local path or s3:// URI.")
    output: Uri = Field(description="Dataset URI (s3://bucket/prefix or a local directory).")
    gain: str | None = Field(None, description="Gain column. criteo-*: conversion (default), click or attribution.")
    penalty: float = Field(0.0, ge=0, le=1e6, description="Budget penalty s in r = MinMaxNorm(g - s*w).")
    splits: SplitSpec = Field(default_factory=SplitSpec)
    top_k_channels: int = Field(10, ge=2, le=1000, description="criteo-attribution: keep the K campaigns with most rows as channels.")
    on_bad_rows: Literal["error", "quarantine"] = Field("error", description="error: stop at the first bad row; quarantine: write bad rows aside and count them.")
    min_steps: int = Field(2, ge=1, le=100_000, description="Users with fewer steps are dropped (and counted).")
    shard_max_steps: int = Field(250_000, ge=100, le=100_000_000, description="Upper bound on steps per Parquet shard.")
    chunk_rows: int = Field(200_000, ge=1000, le=100_000_000, description="Rows read per chunk while streaming the input.")
    max_journey_length: int = Field(0, ge=0, le=1_000_000, description="Cut journeys longer than this into consecutive journeys (0 = no cut).")
    journeys: JourneysFormat = Field(default_factory=JourneysFormat, description="Column mapping for source=journeys.")
    manifest_from: Uri | None = Field(None, description="Preprocess with an existing manifest (dataset or checkpoint URI): same vocabulary and normalization.")
    spill_partitions: int = Field(0, ge=0, le=4096, description="Hash partitions by user spilled to local disk while grouping rows into journeys (0 = one per ~128 MB of input).")
    spill_dir: Uri | None = Field(None, description="Local directory for the spill partitions (default: the system temp directory).")


# ----------------------------------------------------------------------------- decisions

class DecisionSpec(_Strict):
    """The decision layer (mtorl/evaluation/decision.py): which channel, and whom to serve within a budget."""

    policy: Literal["reward", "imitation"] = Field("reward", description="reward: argmax of the per-channel reward head minus s*cost, where the logs support the channel; imitation: the action decoder's pi-reweighted choice (imitates the logger).")
    support_threshold: float = Field(0.5, ge=0, le=1, description="tau (BCQ-style): a channel is allowed only when pi(c|s) >= tau * max_c pi(c|s); 0 = every channel. The default 0.5 is conservative for a reward head not yet validated (in the simulator a 1-epoch model acting freely, tau = 0, lost to the logger); lower it when the val DR value says so (sim-train.yaml uses 0).")
    pessimism: float = Field(0.0, ge=0, description="beta: score r_hat - beta * sqrt(r_hat (1 - r_hat) / pi(c|s)), a lower bound that is low where the logs rarely chose c.")
    budget: float | None = Field(0.3, gt=0, le=1, description="Offline budget as a fraction of the split's logged cost: the validation metric val/select_rate@budget and the report's s.")
    penalty: float | None = Field(None, ge=0, description="Fixed penalty s (reward units per unit cost) where no budget is given (the OPE channel policy; /v1/allocate without a budget). None = 0.")
    fill: bool = Field(True, description="Spend the budget left at the Lagrangian breakpoint on the marginal users (spend stays <= budget).")
    ensemble_pessimism: float = Field(0.0, ge=0, description="beta_e: an ensemble checkpoint (mtorl ensemble) scores r_hat - beta_e * sd, sd the members' population std of r_hat, after the pessimism above; 0 = the members' mean alone. A single model has no spread (sd = 0), so it acts the same at every beta_e. In the simulator beta_e = 1, screened on held-out closed-loop seeds, closed more of the gap (docs/results/sim-closed-loop.md).")
    channel_cost_weight: float = Field(1.0, ge=0, le=1, description="g: the channel is chosen by argmax_c r_hat_c - g*s*cost_c, the user served on r_hat - s*cost of that channel. 1 = the Lagrangian rule; below 1 the choice between channels weighs cost less than the budget does. In the simulator g = 0.6, chosen on held-out closed-loop seeds, closed more of the gap (docs/results/sim-closed-loop.md).")

    @classmethod
    def of_job(cls, job: Mapping[str, Any] | None, explicit: "DecisionSpec | None" = None) -> "DecisionSpec":
        """The decision layer a checkpoint acts by, from the job document it was trained with ({kind, spec}:
        a checkpoint's meta ``spec``): ``explicit`` when given, else the job's ``decision:`` block, else the
        defaults (offline evaluation, serving and the closed loop agree)."""
        if explicit is not None:
            return explicit
        doc = ((job or {}).get("spec") or {}).get("decision")
        return cls.model_validate(doc) if doc else cls()


# ----------------------------------------------------------------------------- model

class TCNSpec(_Strict):
    levels: int = Field(3, ge=1, le=12, description="Residual blocks.")
    kernel_size: int = Field(3, ge=2, le=9)
    dilations: list[int] | None = Field(None, description="One per level; default 1, 2, 4, ... Receptive field = 1 + 2*(k-1)*sum(dilations).")
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _dil(self) -> "TCNSpec":
        if self.dilations is not None and len(self.dilations) != self.levels:
            raise ValueError(f"dilations has {len(self.dilations)} entries, levels is {self.levels}")
        return self


class AttentionSpec(_Strict):
    heads: int = Field(4, ge=1, le=256)
    layers: int = Field(1, ge=0, le=8, description="Self-attention blocks (mtorl, dt); 0 = none (the MTORL ablation without attention).")
    dropout: float = Field(0.1, ge=0, lt=1)


class ModelSpec(_Strict):
    name: ModelName = Field("mtorl", description="mtorl or a baseline: bc_mlp, bc_seq, cql, iql, bcq, dt, logreg.")
    hidden: int = Field(64, ge=4, le=4096, description="Hidden size.")
    tcn: TCNSpec = Field(default_factory=TCNSpec)
    attention: AttentionSpec = Field(default_factory=AttentionSpec)
    decoder_hidden: int = Field(64, ge=4, le=4096)
    history_stats: bool = Field(True, description="Every model: add causal running statistics of past channels and rewards to x_t (see models/layers.py: history_stats). One switch for all models, so a comparison gives every row the same inputs.")
    gamma: float = Field(0.9, ge=0, le=1, description="Discount for the Q-learning baselines and returns-to-go.")
    cql_alpha: float = Field(1.0, ge=0, le=1e6)
    iql_expectile: float = Field(0.7, gt=0, lt=1)
    iql_beta: float = Field(3.0, gt=0, le=1e6)
    bcq_threshold: float = Field(0.3, ge=0, le=1)
    target_update_tau: float = Field(0.005, gt=0, le=1)
    dt_target_return: float | None = Field(None, ge=0, description="dt: return-to-go to condition on at predict time; default: the largest in-window return-to-go seen in training.")

    @model_validator(mode="after")
    def _heads(self) -> "ModelSpec":
        if self.attention.layers and self.hidden % self.attention.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by attention.heads ({self.attention.heads})")
        return self


class ObjectiveSpec(_Strict):
    reward_weight: float = Field(1.0, ge=0, le=1e6, description="mu: weight of the reward loss.")
    pref_weight: float = Field(0.1, ge=0, le=1e6, description="lambda: weight of the return-contrastive preference loss.")
    pref_beta: float = Field(1.0, gt=0, le=1e6, description="beta of the DPO-style preference term.")
    reward_loss: Literal["auto", "bce", "mse"] = Field("auto", description="auto: BCE for binary gains, MSE otherwise.")


class WindowSpec(_Strict):
    length: int = Field(20, ge=2, le=4096, description="Training window length (steps).")
    stride: int | None = Field(None, ge=1, le=4096, description="Step between window starts; default = length.")


class TrainerSpec(_Strict):
    workers: int = Field(2, ge=0, le=1024, description="Ray Train workers (0 = run the loop in the driver process; in a "
                         "sweep's base, in each trial's own process).")
    use_gpu: bool = Field(False)
    cpus_per_worker: float = Field(1.0, gt=0, le=1024)
    gpus_per_worker: float = Field(1.0, gt=0, le=64, description="Used when use_gpu.")
    epochs: int = Field(5, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=1_000_000, description="Windows per worker per step.")
    lr: float = Field(1e-3, gt=0, le=100)
    weight_decay: float = Field(0.0, ge=0, le=100)
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="constant: lr every epoch; cosine: epoch e trains at lr * (1 + cos(pi * e / epochs)) / 2 (training.step.epoch_lr), so the last epochs move the weights least and the checkpoint ranking compares settled models. A resumed run continues the same schedule.")
    grad_clip: float = Field(1.0, ge=0, le=1e6)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    keep_top_k: int = Field(2, ge=1, le=1000, description="Checkpoints kept, ranked by metric.")
    metric: ValMetric = Field("val/loss", description="Validation metric ranking checkpoints (one of mtorl.spec.models.VAL_METRICS).")
    mode: Literal["min", "max"] = "min"
    max_failures: int = Field(2, ge=-1, le=1000, description="Worker-group restarts (FailureConfig).")
    max_steps_per_epoch: int | None = Field(None, ge=1, le=1_000_000_000)
    cache_windows_max_steps: int | None = Field(None, ge=0, le=10**12, description="Splits with at most this many steps are read once by each worker (its equal part of the windows) and kept in its memory for every epoch; larger ones stream from object storage every epoch (file order shuffled per epoch plus a local shuffle buffer; no whole-split cache). Unset = sized from the smallest node's memory (an eighth of it for the cached windows); 0 = always stream.")
    compile: bool = Field(False, description="torch.compile the model (nn.Module.compile; checkpoints are unchanged). Off by default: see BENCHMARKS.md for what it costs and gains.")

    @model_validator(mode="after")
    def _one_rank_per_gpu(self) -> "TrainerSpec":
        if self.use_gpu and self.workers > 1 and self.gpus_per_worker < 1:
            raise ValueError(f"trainer.gpus_per_worker={self.gpus_per_worker} with {self.workers} GPU workers can put two "
                             "ranks on one GPU, which NCCL rejects; use gpus_per_worker: 1 (one rank per GPU)")
        return self


class TrackingSpec(_Strict):
    wandb: Literal["offline", "online", "disabled"] = Field("offline", description="offline needs no network or key; online needs WANDB_API_KEY.")
    project: str = "mtorl"
    entity: str | None = None
    group: str | None = None


class TrainSpec(_Strict):
    data: Uri = Field(description="Prepared dataset URI (holds manifest.json).")
    output: Uri = Field(description="Runs root URI; the run lives at OUTPUT/<metadata.name>.")
    window: WindowSpec = Field(default_factory=WindowSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    objective: ObjectiveSpec = Field(default_factory=ObjectiveSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    run_policy: RunPolicy = Field(default_factory=RunPolicy, alias="runPolicy")
    decision: DecisionSpec = Field(default_factory=DecisionSpec, description="Decision layer of the validation metrics val/select_rate@budget and val/decision_dr, and the checkpoint's default for evaluation and the closed loop.")


# ----------------------------------------------------------------------------- evaluate

class OnlineSpec(_Strict):
    """Closed-loop evaluation in the simulator a checkpoint's logs came from (``mtorl simulate`` outputs only)."""

    users: int = Field(2000, ge=1, le=10_000_000, description="Fresh simulated users.")
    budget: float = Field(0.3, gt=0, le=10, description="Budget as a fraction of the logging policy's unconstrained spend.")


class EvaluateSpec(_Strict):
    checkpoint: Uri = Field(description="Checkpoint URI (a checkpoint dir, or a run dir: its best checkpoint).")
    data: Uri | None = Field(None, description="Prepared dataset URI; default: the checkpoint's own dataset.")
    split: Literal["train", "val", "test"] = "test"
    input: Uri | None = Field(None, description="New raw logs to preprocess with the checkpoint's manifest (needs source).")
    source: Source | None = None
    output: Uri = Field(description="Report URI or directory.")
    budget_fractions: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 11)])
    bootstrap: int = Field(200, ge=10, le=100_000, description="Bootstrap resamples for OPE intervals.")
    compare: list[Uri] = Field(default_factory=list, description="Further checkpoints put side by side (heuristics always are).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    run_policy: RunPolicy = Field(default_factory=RunPolicy, alias="runPolicy")
    decision: DecisionSpec | None = Field(None, description="Decision layer for every row of the report; None = the checkpoint's training spec's.")
    online: OnlineSpec | None = Field(None, description="Set: evaluate in closed loop in the simulator instead of on logs.")
    stream_min_steps: int | None = Field(None, ge=0, description="Read the splits in batches of users (streaming: bounded memory) when the evaluated split plus train hold more steps than this; None = sized from this machine's memory; 0 = always stream. Changes memory, never results.")
    ray_min_steps: int = Field(2_000_000, ge=0, description="A streamed split with more steps than this is scored with Ray Data (map_batches, one task per shard, the models loaded once per worker; starts Ray when none runs); below, on this process. Changes speed, never results.")
    exact_max_steps: int = Field(250_000, ge=1, description="The evaluated split's per-step predictions are kept whole up to this many steps, and every number is exact. Above it, the metrics with sufficient statistics (accuracy, macro-F1, logloss, ECE, ...) stay exact and those needing every point (AUC, budget curve, OPE) use a seeded uniform sample of users of about this many steps (the report says so).")

    @field_validator("budget_fractions")
    @classmethod
    def _fr(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f <= 1 for f in v):
            raise ValueError("every budget fraction must be in (0, 1]")
        return sorted(v)


# ----------------------------------------------------------------------------- tune

class ParamSpace(_Strict):
    type: Literal["double", "int", "categorical"] = "double"
    min: float | None = None
    max: float | None = None
    log: bool = False
    values: list[Any] | None = Field(None, description="categorical (and grid) values.")

    @model_validator(mode="after")
    def _ok(self) -> "ParamSpace":
        if self.type == "categorical":
            if not self.values:
                raise ValueError("categorical needs values")
        elif self.values is None and (self.min is None or self.max is None or self.min >= self.max):
            raise ValueError("needs min < max (or values)")
        return self


class TuneObjective(_Strict):
    metric: ValMetric = "val/reward_auc"
    mode: Literal["min", "max"] = "max"
    goal: float | None = Field(None, description="Stop the sweep once a trial reaches it.")


class TuneSpec(_Strict):
    base: TrainSpec = Field(description="The TrainJob spec every trial starts from.")
    parameters: dict[str, ParamSpace] = Field(description="Dotted TrainSpec paths (objective.reward_weight, ...) to their spaces.")
    objective: TuneObjective = Field(default_factory=TuneObjective)
    algorithm: Literal["random", "grid", "tpe"] = "random"
    early_stopping: Literal["none", "asha", "median"] = "asha"
    grace_period: int = Field(1, ge=1, le=100_000, description="Epochs before early stopping may act.")
    max_trials: int = Field(4, ge=1, le=100_000)
    parallel_trials: int = Field(1, ge=1, le=1024)
    max_failed_trials: int = Field(0, ge=0, le=100_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    output: Uri = Field(description="Sweep root URI.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, alias="runPolicy")

    @property
    def trials(self) -> int:
        """How many trials the sweep runs: a grid runs every point of it (the listed values, or 3 points per
        range) whatever ``max_trials`` says; the other algorithms run ``max_trials``."""
        if self.algorithm != "grid":
            return self.max_trials
        n = 1
        for p in self.parameters.values():
            n *= len(p.values) if p.values is not None else 3
        return n

    @field_validator("parameters")
    @classmethod
    def _paths_exist(cls, v: dict[str, ParamSpace]) -> dict[str, ParamSpace]:
        for path in v:
            model: Any = TrainSpec
            for part in path.split("."):
                fields = getattr(model, "model_fields", None)
                if not fields or part not in fields:
                    raise ValueError(f"{path!r} is not a TrainSpec field path (e.g. objective.reward_weight, trainer.lr)")
                model = fields[part].annotation
        return v


# ----------------------------------------------------------------------------- serve

class AutoscalingSpec(_Strict):
    min_replicas: int = Field(1, ge=0, le=1024)
    max_replicas: int = Field(1, ge=1, le=1024)
    target_ongoing_requests: float = Field(8, gt=0)


class ServeSpec(_Strict):
    checkpoint: Uri = Field(description="Checkpoint URI (or run dir: its best).")
    host: str = Field("127.0.0.1", description="Bind address. Anything but loopback requires auth_token_env.")
    port: int = Field(8000, ge=1, le=65535)
    auth_token_env: str | None = Field(None, description="Name of the env var holding the bearer token.")
    app_name: str = "mtorl"
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    request_timeout_s: float = Field(10.0, gt=0)
    max_journey_length: int = Field(512, ge=1)
    max_users_per_request: int = Field(1000, ge=1)
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs each replica reserves (Ray num_gpus) and runs its forward on (cuda); 0 = CPU only. The cluster needs GPU nodes (a GPU worker group).")
    max_body_bytes: int = Field(4_000_000, ge=1024)
    num_cpus_per_replica: float = Field(0.5, gt=0)
    access_log: bool = Field(True, description="Log every request from the replica (Serve's access log) to its log "
                             "file under the Ray session's logs/serve/ (not streamed to the driver's stdout).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Replica log level.")
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    ingress: Literal["proxy", "direct", "haproxy"] = Field(
        "proxy", description="proxy: Serve's HTTP proxy routes requests to the replicas (autoscaling, zero-downtime "
        "updates). direct: the single replica serves HTTP on `port` itself (Ray Serve direct ingress), skipping the "
        "proxy hop: several times the requests/s on a small CPU budget (BENCHMARKS.md); one replica, no rolling update. "
        "haproxy: Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY) on `port`, routing to each replica's own HTTP "
        "server (autoscaling and rolling updates like proxy, no Python proxy hop: about 3x proxy's requests/s on 2 "
        "cores, BENCHMARKS.md); its stats and metrics listeners are kept on loopback by the mtorl-haproxy shim. A "
        "replica that crashes drops its in-flight requests (no 503 + Retry-After as with proxy): use min_replicas 2.")
    max_surge_percent: int = Field(100, ge=0, le=100, description="Extra replicas a rolling update may start, in % of "
                                   "the replica count: with 100 the new replica starts, and becomes healthy, before the "
                                   "old one stops (no stall while the new model loads). 0: Serve's stop-then-start. "
                                   "ingress 'direct' always uses 0 (its one replica holds `port`).")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, alias="runPolicy")

    @model_validator(mode="after")
    def _direct_is_one_replica(self) -> "ServeSpec":
        if self.ingress == "direct" and self.autoscaling.max_replicas != 1:
            raise ValueError("ingress 'direct' serves from one replica on `port`: set autoscaling.max_replicas to 1 "
                             "(or use ingress 'proxy' to autoscale)")
        return self


# ----------------------------------------------------------------------------- simulate

class SimulateSpec(_Strict):
    output: Uri = Field(description="URI (dir) of the journeys Parquet shards.")
    users: int = Field(2000, ge=1, le=1_000_000_000)
    mean_steps: float = Field(20.0, gt=1, le=100_000, description="Mean journey length.")
    channels: list[str] = Field(default_factory=lambda: ["search", "social", "video"])
    channel_costs: list[float] | None = Field(None, description="Cost per exposure per channel; default 1, 2, 3 ...")
    n_features: int = Field(4, ge=1, le=10_000, description="Observable user features.")
    base_rate: float = Field(0.1, gt=0, lt=1)
    logging_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logging policy.")
    shard_steps: int = Field(500_000, ge=1000, le=100_000_000)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    calibrate_from: Uri | None = Field(None, description="Prepared dataset URI to fit channel shares, rates and lengths to.")
    channel_shares: list[float] | None = Field(None, description="Target share of each channel under the logging policy (sums to 1); default: whatever the random logging weights give.")
    channel_rates: list[float] | None = Field(None, description="Target mean reward rate of each channel under the logging policy; default: around base_rate, higher for costlier channels.")
    length_dispersion: float | None = Field(None, gt=0, description="Negative-binomial shape k of (length - 2); None = 1 (geometric). Larger k = less spread.")
    write_truth: bool = Field(True, description="Also write the ground-truth reward probability of every channel per step (columns true_p0.., not part of the journeys mapping).")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, alias="runPolicy")


# ----------------------------------------------------------------------------- envelope

class _Job(_Strict):
    api_version: Literal["mtorl/v1"] = Field(API_VERSION, alias="apiVersion")
    metadata: Metadata


class PrepareJob(_Job):
    kind: Literal["PrepareJob"]
    spec: PrepareSpec


class TrainJob(_Job):
    kind: Literal["TrainJob"]
    spec: TrainSpec


class EvaluateJob(_Job):
    kind: Literal["EvaluateJob"]
    spec: EvaluateSpec


class TuneJob(_Job):
    kind: Literal["TuneJob"]
    spec: TuneSpec


class ServeJob(_Job):
    kind: Literal["ServeJob"]
    spec: ServeSpec


class SimulateJob(_Job):
    kind: Literal["SimulateJob"]
    spec: SimulateSpec


Job = Annotated[
    Union[PrepareJob, TrainJob, EvaluateJob, TuneJob, ServeJob, SimulateJob],
    Field(discriminator="kind"),
]
KINDS: dict[str, type[_Job]] = {c.__name__: c for c in (PrepareJob, TrainJob, EvaluateJob, TuneJob, ServeJob, SimulateJob)}

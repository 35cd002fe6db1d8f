"""Advertising-journey simulator with a known ground truth (numpy only) and closed-loop evaluation."""

from mtorl.sim.generate import (
    calibrate,
    dataset_stats,
    journeys_format,
    journeys_mapping,
    load_dataset_stats,
    read_journeys,
    simulate,
)
from mtorl.sim.model import STEP_FEATURES, Simulator, UserState
from mtorl.sim.online import (
    Observation,
    logging_policy,
    observable_oracle_policy,
    ope_error,
    oracle_policy,
    random_policy,
    run_online,
    true_policy_value,
)

__all__ = [
    "STEP_FEATURES",
    "Observation",
    "Simulator",
    "UserState",
    "calibrate",
    "dataset_stats",
    "journeys_format",
    "journeys_mapping",
    "load_dataset_stats",
    "logging_policy",
    "observable_oracle_policy",
    "ope_error",
    "oracle_policy",
    "random_policy",
    "read_journeys",
    "run_online",
    "simulate",
    "true_policy_value",
]

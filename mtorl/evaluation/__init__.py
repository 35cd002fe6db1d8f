"""Evaluation: metrics, budget allocation, off-policy estimators, heuristics, reports (no Ray, no torch).

Every function takes a `Predictions` (flattened steps of a split; see predictions.py) or plain arrays.

The names below load their submodule on first use (PEP 562), so that code needing only the allocation
modules (the Serve replica) does not import scikit-learn, SciPy and matplotlib with them.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "allocate_requests": "allocation", "allocate_users": "allocation", "budget_curve": "allocation",
    "channel_scores": "allocation", "decide": "decision", "decision_metrics": "decision",
    "HistoryPrior": "heuristics", "heuristic_predictions": "heuristics",
    "channel_metrics": "metrics", "reward_metrics": "metrics",
    "behaviour_propensities": "ope", "evaluate_policies": "ope", "fit_behaviour_model": "ope",
    "off_policy_estimates": "ope",
    "Predictions": "predictions", "outcome": "predictions",
    "evaluate_predictions": "report", "plot_training_curves": "report", "write_report": "report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

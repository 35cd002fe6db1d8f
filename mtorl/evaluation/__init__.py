"""Evaluation: metrics, budget allocation, off-policy estimators, heuristics, reports (no Ray, no torch).

Every function takes a `Predictions` (flattened steps of a split; see predictions.py) or plain arrays.
"""

from mtorl.evaluation.allocation import allocate_requests, allocate_users, budget_curve, channel_scores
from mtorl.evaluation.heuristics import HistoryPrior, heuristic_predictions
from mtorl.evaluation.metrics import channel_metrics, reward_metrics
from mtorl.evaluation.ope import behaviour_propensities, evaluate_policies, fit_behaviour_model, off_policy_estimates
from mtorl.evaluation.predictions import Predictions, outcome
from mtorl.evaluation.report import evaluate_predictions, plot_training_curves, write_report

__all__ = ["Predictions", "outcome", "HistoryPrior", "heuristic_predictions", "channel_metrics",
           "reward_metrics", "channel_scores", "allocate_users", "allocate_requests", "budget_curve",
           "fit_behaviour_model", "behaviour_propensities", "off_policy_estimates", "evaluate_policies",
           "evaluate_predictions", "write_report", "plot_training_curves"]

"""The comparison tables (scripts/compare_tables.py): rows keyed and read from the evaluation's metrics."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from mtorl.evaluation.run import run_label

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compare_tables.py"


def _tables():
    spec = importlib.util.spec_from_file_location("compare_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_run_label_names_the_run_of_a_checkpoint() -> None:
    assert run_label("s3://mtorl/runs/kr-mtorl-no-stats/checkpoint_epoch_000004") == "kr-mtorl-no-stats"
    assert run_label("s3://mtorl/runs/kr-mtorl-no-stats/checkpoint_epoch_000004/") == "kr-mtorl-no-stats"
    assert run_label("/tmp/some-dir") == "some-dir"


def summary(auc: float, lo: float, sel: float) -> dict:
    return {
        "kind": "model",
        "reward": {"auc": auc, "logloss": 0.4, "ece": 0.01},
        "channel": {"accuracy": 0.3},
        "base_rate": 0.17,
        "budget": [
            {"fraction": 0.2, "select_rate": sel, "penalty": 0.5},
            {"fraction": 0.5, "select_rate": sel / 2, "penalty": 0.1},
        ],
        "ope": {"dr": {"value": lo + 0.01, "ci_low": lo, "ci_high": lo + 0.02}},
    }


def test_results_and_keys_read_the_evaluation() -> None:
    t = _tables()
    r = t.results_of(summary(0.7, 0.18, 0.33))
    assert r["reward_auc"] == 0.7 and r["select@0.2"] == 0.33 and r["select@0.5"] == 0.165 and r["penalty@0.2"] == 0.5
    assert r["dr_lower_above_logged"] is True and r["logged_value"] == 0.17
    assert t.results_of(summary(0.7, 0.10, 0.33))["dr_lower_above_logged"] is False
    compare = {"mtorl": {}, "mtorl@kr-mtorl-no-stats": {}, "logreg": {}}
    info = {"model": "mtorl", "run": "s3://mtorl/runs/kr-mtorl-no-stats"}
    assert t.key_of("mtorl-no-stats", info, compare) == "mtorl@kr-mtorl-no-stats"
    assert t.key_of("mtorl", {"model": "mtorl", "run": "s3://mtorl/runs/kr-mtorl"}, compare) == "mtorl"
    with pytest.raises(KeyError):
        t.key_of("bcq", {"model": "bcq", "run": "s3://mtorl/runs/kr-bcq"}, compare)


def test_tables_bold_the_best_and_state_the_inputs() -> None:
    t = _tables()
    inputs = {
        "history_stats": False,
        "lr": 0.003,
        "attention_layers": 1,
        "pref_weight": 0.1,
        "reward_weight": 1.0,
        "val": {"reward_auc": 0.65, "select_rate@budget": 0.3},
    }
    rows = [
        {
            "label": "a",
            "model": "mtorl",
            "inputs": {**inputs, "history_stats": True},
            "metrics": t.results_of(summary(0.7, 0.18, 0.33)),
        },
        {"label": "b", "model": "logreg", "inputs": inputs, "metrics": t.results_of(summary(0.6, 0.10, 0.30))},
    ]
    lines = t.main_table(rows)
    assert lines[2].startswith("| a | mtorl | on | 0.0030 | 0.650 | 0.300 | **0.700** |") and "**0.330**" in lines[2]
    assert lines[3].startswith("| b | logreg | off |") and lines[3].endswith("| no |")
    abl = t.ablation_table(rows)
    assert abl[3].startswith("| b | off | 1 | 0.10 | 1.00 | 0.650 | 0.600 |")

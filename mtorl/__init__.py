"""mtorl: multi-task offline RL for budget-aware advertising, trained and served on Ray."""

__version__ = "0.1.0"

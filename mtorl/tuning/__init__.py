"""Ray Tune sweeps over the multi-task loss weighting."""

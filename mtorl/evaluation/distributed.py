"""Scoring a streamed split with Ray Data: one ``map_batches`` task per shard, the models loaded once per worker.

Thin glue over `run.score_batch`: each task reads one shard (checked against the manifest's sha256), scores
its batches of users by the heuristics and every model, and hands back `BatchScore`s (exact metric sums,
the sampled users' predictions). The driver merges them in shard order, so the report equals the
single-process one.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from mtorl.data.manifest import Manifest
from mtorl.evaluation.heuristics import HistoryPrior
from mtorl.evaluation.streaming import BatchScore, UserSample

__all__ = ["score_split_ray"]


class ShardScorer:
    """The map_batches callable: the checkpoints are loaded once per worker (as weights only)."""

    def __init__(self, data_uri: str, manifest: dict[str, Any], split: str, checkpoints: Sequence[tuple[str, str]],
                 channels: Sequence[str], binary: bool, prior: HistoryPrior, sample: UserSample) -> None:
        from mtorl.data.manifest import Manifest
        from mtorl.serving.predictor import Predictor

        self.data_uri, self.split, self.channels, self.binary = data_uri, split, list(channels), binary
        self.manifest = Manifest.model_validate(manifest)
        self.prior, self.sample = prior, sample
        self.predictors = [(key, Predictor.from_checkpoint(uri)) for key, uri in checkpoints]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from mtorl.evaluation.run import score_batch
        from mtorl.evaluation.streaming import split_batches

        out = [score_batch(b, self.channels, self.binary, self.prior, self.predictors, self.sample)
               for i in batch["shard"] for b in split_batches(self.data_uri, self.manifest, self.split, shards=[int(i)])]
        score = np.empty(len(out), dtype=object)
        score[:] = out
        return {"score": score}


def score_split_ray(data_uri: str, manifest: Manifest, split: str, checkpoints: Sequence[tuple[str, str]],
                    channels: Sequence[str], binary: bool, prior: HistoryPrior, sample: UserSample) -> Iterator[BatchScore]:
    """`BatchScore`s of every batch of the split, in shard order."""
    import ray

    from mtorl.raycluster import init_ray

    init_ray()
    n = len(manifest.split(data_uri, split).shards)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items([{"shard": i} for i in range(n)], override_num_blocks=max(n, 1))
    ds.context.execution_options.preserve_order = True  # the report merges batches in split order
    ds = ds.map_batches(ShardScorer, batch_size=1, batch_format="numpy", num_cpus=1,
                        concurrency=(1, max(1, min(n, cpus // 2))),
                        fn_constructor_kwargs={"data_uri": data_uri, "manifest": manifest.model_dump(mode="json"),
                                               "split": split, "checkpoints": list(checkpoints), "channels": list(channels),
                                               "binary": binary, "prior": prior, "sample": sample})
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        yield from batch["score"]

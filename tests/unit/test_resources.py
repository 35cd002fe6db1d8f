"""Fail fast on resources: what the cluster can't place is one line naming it (ray's view faked here)."""

from __future__ import annotations

import pytest

from mtorl.raycluster import ResourceError, check_resources


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 6.0, "GPU": 1.0})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)


def test_fits(cluster: None) -> None:
    check_resources({"CPU": 1.0}, 6, "w")
    check_resources({"CPU": 1.0, "GPU": 1.0}, 1, "w")


@pytest.mark.parametrize("per,units,needle", [
    ({"CPU": 1.0}, 7, "needs 7 CPU in all (7 x 1), the cluster has 6"),
    ({"CPU": 5.0}, 1, "needs 5 CPU on one node, the largest node has 4"),
    ({"CPU": 1.0, "GPU": 1.0}, 2, "needs 2 GPU in all (2 x 1), the cluster has 1"),
    ({"CPU": 0.5, "TPU": 1.0}, 1, "needs 1 TPU in all (1 x 1), the cluster has 0"),
])
def test_what_is_missing_is_named(cluster: None, per: dict[str, float], units: int, needle: str) -> None:
    with pytest.raises(ResourceError) as e:
        check_resources(per, units, "trainer.workers=N")
    assert str(e.value).startswith("trainer.workers=N: the Ray cluster cannot provide it: ") and needle in str(e.value)

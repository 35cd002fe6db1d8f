"""The local cluster restarts a node only for Ray's own start-up timeout, never for another failure."""

from pathlib import Path

from mtorl.jobs import _slow_start


def test_only_rays_startup_timeout_counts_as_a_slow_start(tmp_path: Path) -> None:
    slow = tmp_path / "head.log"
    # the last line `ray start` prints when its raylet misses Ray's fixed 30 s (ray/_private/node.py)
    slow.write_text("Traceback (most recent call last):\n  ...\nException: The current node timed out during "
                    "startup. This could happen because some of the raylet failed to startup or the GCS has "
                    "become overloaded.\n")
    other = tmp_path / "worker1.log"
    other.write_text("ConnectionError: ray client connection timeout\nOSError: [Errno 98] Address already in use\n")
    gcs = tmp_path / "worker2.log"
    gcs.write_text("ray.exceptions.RpcError: Timed out while waiting for GCS to become available.\n")
    assert _slow_start(slow) and _slow_start(gcs)
    assert not _slow_start(other)
    assert not _slow_start(tmp_path / "missing.log")


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    import socket

    from mtorl.localhost import PICK_FROM, ephemeral_range, free_ports

    ports = free_ports(6)
    assert len(set(ports)) == 6
    eph = ephemeral_range()
    if eph is not None and eph[0] - PICK_FROM >= 1_000:  # Linux: never a port a bind(0) elsewhere could take
        assert all(PICK_FROM <= p < eph[0] for p in ports), (ports, eph)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

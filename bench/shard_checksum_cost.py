"""Cost of checking shard sha256 on read: plain pq.read_table vs read bytes + sha256 + parse, per pass.

python bench/shard_checksum_cost.py --input ../shared/data/kuairand_sequence.csv.gz --out /tmp/kds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
from pyarrow import fs as pafs

from mtorl.data.manifest import parse_shard, read_shard_bytes
from mtorl.data.prepare import prepare
from mtorl.spec.models import PrepareSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True, help="KuaiRand sample CSV(.gz)")
    ap.add_argument("--out", required=True, help="local folder for the prepared dataset")
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    out = Path(a.out)
    if not (out / "manifest.json").exists():
        prepare(PrepareSpec(source="kuairand-sequence", input=a.input, output=str(out), shard_max_steps=20_000),
                progress=lambda _m: None)
    m = json.loads((out / "manifest.json").read_text())
    shards = [(str(out / s["path"]), s["sha256"]) for sp in m["splits"].values() for s in sp["shards"]]
    fs = pafs.LocalFileSystem()
    fns = {
        "plain": lambda: sum(pq.read_table(p).num_rows for p, _ in shards),
        "checked": lambda: sum(parse_shard(p, read_shard_bytes(fs, p, p), h).num_rows for p, h in shards),
        "sha256_only": lambda: sum(len(hashlib.sha256(Path(p).read_bytes()).digest()) for p, _ in shards),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(a.reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    size = sum(Path(p).stat().st_size for p, _ in shards)
    print(json.dumps({"shards": len(shards), "bytes": size, "median_s": med, "checked_over_plain": med["checked"] / med["plain"],
                      "sha256_MBps": size / med["sha256_only"] / 1e6}, indent=1))


if __name__ == "__main__":
    main()

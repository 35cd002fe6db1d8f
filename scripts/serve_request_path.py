"""CPU per request of the serving request path (parse, validate, preprocess, score, response body) at a
git revision vs the working tree, the model forward left out (constant outputs), 1 and 32 users of
20 steps per request, alternating old and new in one process:

    python scripts/serve_request_path.py [REV]     # REV default fdc4ca1 (before per-request checks moved)

The old revision's ``mtorl/serving/schemas.py`` (and ``service.py``, where it has one: then the old path is
its ``Service``, as the replica ran it) is loaded from git into a temp folder.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

rev = sys.argv[1] if len(sys.argv) > 1 else "fdc4ca1"
tmp = Path(tempfile.mkdtemp(prefix="mtorl-reqpath-"))
(tmp / "old_schemas.py").write_text(
    subprocess.run(
        ["git", "show", f"{rev}:mtorl/serving/schemas.py"], check=True, capture_output=True, text=True
    ).stdout
)
old_service_src = subprocess.run(["git", "show", f"{rev}:mtorl/serving/service.py"], capture_output=True, text=True)
if old_service_src.returncode == 0:
    (tmp / "old_service.py").write_text(
        old_service_src.stdout.replace("from mtorl.serving.schemas import", "from old_schemas import")
    )
sys.path.insert(0, str(tmp))
import old_schemas as old  # noqa: E402
from fastapi.responses import JSONResponse
from mtorl.data.manifest import Manifest
from mtorl.serving import schemas as new
from mtorl.serving.service import Service

C = ["search", "social", "video"]
MAN = {
    "channels": C,
    "step_features": [f"q{i}" for i in range(8)],
    "user_features": ["age", "f1"],
    "categorical": {},
    "normalization": {"mean": [0.0] * 10, "std": [1.0] * 10},
    "penalty": 0.1,
    "reward_norm": {"min": -0.3, "max": 0.9},
}


def user(i, T=20):
    return {
        "user_id": f"u{i}",
        "journey": [
            {
                "channel": C[(i + t) % 3],
                "gain": float(t % 2),
                "cost": 1.0 + t % 3,
                "features": {f: 0.5 * t + k for k, f in enumerate(MAN["step_features"])},
            }
            for t in range(T)
        ],
        "user_features": {"age": 30.0, "f1": 0.1},
    }


bodies = {
    n: [json.dumps({"users": [user(100 * k + i) for i in range(n)]}).encode() for k in range(16)] for n in (1, 32)
}


class FakePred:
    manifest = Manifest.model_validate({**MAN, "schema_version": 1, "version": "v1", "splits": {}})
    meta = SimpleNamespace(sha256={"model.safetensors": "abc"}, spec={})

    def predict_next(self, journeys, nxt):
        b = len(journeys)
        return np.full((b, 3), 1 / 3), np.full((b, 3), 0.2), None  # a single model: no reward spread


class OldFakePred(FakePred):
    def predict_next(self, journeys, nxt):  # before the reward spread: (probs, reward)
        return super().predict_next(journeys, nxt)[:2]


if old_service_src.returncode == 0:
    import old_service  # noqa: E402

    svc_old = old_service.Service(OldFakePred(), old.Limits(), 4_000_000)

    def old_path(body):
        return svc_old.run_batch([svc_old.parse("recommend", body)])[0]

else:
    pre_old = old.Preprocessor(MAN)

    def old_path(body):
        req = old.parse_request(old.RecommendRequest, json.loads(body))
        p = pre_old.prepare(req.users)
        probs, reward = OldFakePred().predict_next(p.journeys, p.next_states)
        best, kb = old.recommend_scores(probs, reward, p.costs)
        return JSONResponse(
            {"model_version": "abc", "users": old.recommendations(p, probs, reward, C, scored=(best, kb))}
        ).body


svc = Service(FakePred(), new.Limits(), 4_000_000)


def new_path(body):
    return svc.run_batch([svc.parse("recommend", body)])[0]


assert json.loads(old_path(bodies[1][0])) == json.loads(new_path(bodies[1][0]))
for n in (1, 32):
    res = {"old": [], "new": []}
    for rep in range(6):
        for name, fn in (
            (("old", old_path), ("new", new_path)) if rep % 2 == 0 else (("new", new_path), ("old", old_path))
        ):
            t = time.process_time()
            for _ in range(10):
                for b in bodies[n]:
                    fn(b)
            res[name].append((time.process_time() - t) / (10 * len(bodies[n])) * 1000)
    print(
        f"{n} user(s)/request: CPU ms per request (median of 6): old {np.median(res['old']):.3f}, new {np.median(res['new']):.3f}, "
        f"new/old {np.median(res['new']) / np.median(res['old']):.2f}"
    )

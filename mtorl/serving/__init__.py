"""Serving: ``Predictor`` (a checkpoint -> predictions, no Serve), the request path (``service``: checks,
preprocessing, batching, responses; no Ray), the Ray Serve application (``app``) and a plain uvicorn
server running the same request path (``plain``, the bench's reference).

Kept free of heavy imports: ``mtorl.serving.app`` (Ray Serve, FastAPI) and ``mtorl.serving.predictor``
(torch) are imported by whoever needs them. Serve config ``import_path``: ``mtorl.serving.app:build_app``.
"""

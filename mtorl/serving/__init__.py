"""Serving: ``Predictor`` (a checkpoint -> predictions, no Serve) and the Ray Serve application.

Kept free of heavy imports: ``mtorl.serving.app`` (Ray Serve, FastAPI) and ``mtorl.serving.predictor``
(torch) are imported by whoever needs them. Serve config ``import_path``: ``mtorl.serving.app:build_app``.
"""

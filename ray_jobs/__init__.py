"""Entrypoints for ``ray job submit -- python -m ray_jobs.<job> SPEC [--set ...]``.

Each module runs one job kind through the same code as the ``mtorl`` CLI, and stores the job's
result JSON in object storage (``MTORL_RESULT_URI`` when set) so it is fetchable after the job ends.
"""

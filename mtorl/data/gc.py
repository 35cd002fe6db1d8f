"""Orphans a killed prepare leaves: version folders no commit marker covers, and spill folders in the temp dir.

A prepare writes ``<output>/<version>/...`` shards, then ``<version>/manifest.json`` (the version's commit
marker), then ``<output>/manifest.json`` (the pointer). A version folder without its marker is an
uncommitted one: a prepare that failed or was killed (or is still running: hence the minimum age). The
version folder named by the pointer is never an orphan. Folders written before markers existed count as
committed when the pointer names them, else as orphans once old enough.
"""

from __future__ import annotations

import calendar
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from mtorl import storage
from mtorl.data.manifest import MANIFEST_FILE
from mtorl.localhost import pid_alive

_VERSION = re.compile(r"^v(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
SPILL_PREFIX = "mtorl-prepare-"


def version_age_s(version: str, now: float | None = None) -> float | None:
    m = _VERSION.match(version)
    if not m:
        return None
    t = calendar.timegm(time.strptime(m.group(1), "%Y%m%dT%H%M%SZ"))
    return (time.time() if now is None else now) - t


def orphaned_versions(dataset_uri: str, min_age_s: float = 6 * 3600) -> list[dict[str, Any]]:
    """[{version, uri, files, age_s}] of the uncommitted version folders under ``dataset_uri``."""
    current = None
    if storage.exists(storage.join(dataset_uri, MANIFEST_FILE)):
        try:
            current = storage.read_json(storage.join(dataset_uri, MANIFEST_FILE)).get("version")
        except (ValueError, AttributeError, storage.StorageError):
            current = None
    by_version: dict[str, list[str]] = {}
    base = dataset_uri.rstrip("/")
    for f in storage.list_files(dataset_uri):
        rel = f[len(base) + 1:]
        head = rel.split("/", 1)[0]
        if _VERSION.match(head) and "/" in rel:
            by_version.setdefault(head, []).append(rel)
    out = []
    for v, files in sorted(by_version.items()):
        if v == current or f"{v}/{MANIFEST_FILE}" in files:
            continue
        age = version_age_s(v) or 0.0
        if age >= min_age_s:
            out.append({"version": v, "uri": storage.join(dataset_uri, v), "files": len(files), "age_s": round(age)})
    return out


def stale_spill_dirs(root: str | None = None) -> list[Path]:
    """Spill folders (``mtorl-prepare-<pid>-*``) whose prepare process is gone."""
    d = Path(root or tempfile.gettempdir())
    out = []
    for p in d.glob(f"{SPILL_PREFIX}*"):
        m = re.match(rf"^{SPILL_PREFIX}(\d+)-", p.name)
        if p.is_dir() and m and not pid_alive(int(m.group(1))):
            out.append(p)
    return out


def remove_stale_spill_dirs(root: str | None = None) -> int:
    n = 0
    for p in stale_spill_dirs(root):
        shutil.rmtree(p, ignore_errors=True)
        n += 1
    return n


def collect_garbage(dataset_uri: str, delete: bool, min_age_hours: float, progress: Any = print) -> int:
    """``mtorl datasets gc URI [--delete] [--min-age-hours H]``: list (or remove) orphaned version folders and
    stale spill folders; returns how many were found."""
    orphans = orphaned_versions(dataset_uri, min_age_hours * 3600)
    for o in orphans:
        progress(f"{'removing' if delete else 'orphaned'} {o['uri']} ({o['files']} files, {o['age_s'] / 3600:.1f} h old)")
        if delete:
            storage.delete_prefix(o["uri"])
    spills = stale_spill_dirs()
    for p in spills:
        progress(f"{'removing' if delete else 'stale spill folder'} {p}")
        if delete:
            shutil.rmtree(p, ignore_errors=True)
    if not orphans and not spills:
        progress(f"{dataset_uri}: no orphaned version folders (older than {min_age_hours:g} h) or spill folders")
    elif not delete:
        progress("rerun with --delete to remove them")
    return len(orphans) + len(spills)

"""On-disk feature cache: one folder per key, features as a memory-mapped ``.npy``.

A key is the SHA-256 of everything the features depend on (the weights' content hash or, for a
random-init baseline, its spec and seed; dataset, split and data options; the transform; the
feature kind; the precision). A changed checkpoint therefore gets a new key and a stale entry is
never read. An entry is written to a temporary folder and renamed into place, so a killed run
leaves either a complete entry or none. The cache only saves time: a disk error writing it (no space,
read-only) is one warning, and the run goes on with the features in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfsup.files import describe_os_error, is_user_os_error

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$SELFSUP_CACHE/features`` when set, else ``~/.cache/selfsup/features``."""
    root = os.environ.get("SELFSUP_CACHE")
    return Path(root) / "features" if root else Path.home() / ".cache" / "selfsup" / "features"


def cache_key(parts: dict[str, Any]) -> str:
    """A stable key for ``parts`` (any JSON-serialisable mapping; key order does not matter)."""
    text = json.dumps({"cache_version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass
class CachedFeatures:
    features: np.ndarray  # (N, D) float32, memory-mapped (copy-on-write) when read from the cache
    labels: np.ndarray  # (N,) int64
    info: dict[str, Any]


class FeatureCache:
    """Features by key under ``root``; ``root=None`` disables caching (every ``get`` misses)."""

    def __init__(self, root: str | Path | None):
        self.root = Path(root).expanduser() if root is not None else None

    def path(self, key: str) -> Path | None:
        return self.root / key if self.root is not None else None

    def get(self, key: str) -> CachedFeatures | None:
        folder = self.path(key)
        if folder is None or not (folder / "info.json").is_file():
            return None
        try:
            info = json.loads((folder / "info.json").read_text())
            features = np.load(folder / "features.npy", mmap_mode="c")  # copy-on-write: writable, no copy
            labels = np.load(folder / "labels.npy")
        except (OSError, ValueError):
            return None  # unreadable entry: recompute and overwrite
        if features.shape[0] != labels.shape[0] or info.get("key") != key:
            return None
        return CachedFeatures(features, labels, info)

    def put(self, key: str, features: np.ndarray, labels: np.ndarray, info: dict[str, Any]) -> CachedFeatures:
        folder = self.path(key)
        info = {**info, "key": key, "shape": list(features.shape)}
        if folder is None:
            return CachedFeatures(features, labels, info)
        try:
            self._write(folder, features, labels, info)
        except Exception as err:
            if not is_user_os_error(err):
                raise
            print(
                f"warning: feature cache not written to {folder.parent} ({describe_os_error(err)}); "
                "continuing without it",
                file=sys.stderr,
            )
            return CachedFeatures(features, labels, info)
        return self.get(key) or CachedFeatures(features, labels, info)

    @staticmethod
    def _write(folder: Path, features: np.ndarray, labels: np.ndarray, info: dict[str, Any]) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            np.save(tmp / "features.npy", np.ascontiguousarray(features, dtype=np.float32))
            np.save(tmp / "labels.npy", np.asarray(labels, dtype=np.int64))
            (tmp / "info.json").write_text(json.dumps(info, indent=2, default=str))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

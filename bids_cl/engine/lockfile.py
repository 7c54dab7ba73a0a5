"""Lock files: the SHA-256 of every file of a model folder.

A lock records what was installed, so that a changed or added file is noticed before it is read. It is
no licence to unpickle: checkpoints are always read with ``weights_only=True`` and an allow-list
(``bids_cl.engine.checkpoints``). The lock is written when a model is installed (or built by
``bids_cl-train``) and checked on every load and by ``bids_cl-models verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

LOCK_NAME = "bids_cl_lock.json"
LOCK_VERSION = 1
_CHUNK = 1 << 20
# Files that never belong to a model and that tools drop into folders on their own.
_IGNORED = {".DS_Store", "Thumbs.db"}


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (what lock files record)."""
    return file_digest(path, "sha256")


def _model_files(model_dir: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``model_dir`` except the lock itself."""
    files = []
    for root, dirs, names in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(names):
            if name == LOCK_NAME or name in _IGNORED or name.endswith(".pyc"):
                continue
            full = Path(root) / name
            if full.is_file():
                files.append(full.relative_to(model_dir).as_posix())
    return files


def write_lock_file(model_dir: str | Path, *, source: dict[str, Any] | None = None) -> Path:
    """Hash every file of ``model_dir`` into ``model_dir/bids_cl_lock.json``; return its path.

    ``source`` (where the files came from: DOI, URL, archive hash) is stored for provenance.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"not a model folder: {model_dir}")
    files = {rel: sha256_file(model_dir / rel) for rel in _model_files(model_dir)}
    lock = {
        "lock_version": LOCK_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source or {},
        "files": files,
    }
    path = model_dir / LOCK_NAME
    tmp = path.with_name(f".{LOCK_NAME}.tmp")
    tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_lock_file(model_dir: str | Path) -> dict[str, Any] | None:
    """The parsed lock of ``model_dir``, or None when there is none."""
    path = Path(model_dir) / LOCK_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def verify_lock_file(model_dir: str | Path) -> list[str]:
    """Problems with ``model_dir`` against its lock (empty list = intact).

    A problem is a missing lock, a missing or changed file, or a file that is not in the lock (a
    checkpoint dropped in later would otherwise be loaded unchecked).
    """
    model_dir = Path(model_dir)
    try:
        lock = read_lock_file(model_dir)
    except (OSError, ValueError) as exc:
        return [f"unreadable lock file {model_dir / LOCK_NAME}: {exc}"]
    if lock is None:
        return [f"no lock file ({LOCK_NAME}) in {model_dir}"]
    expected: dict[str, str] = lock.get("files", {})
    if not expected:
        return [f"lock file in {model_dir} lists no files"]
    problems = []
    for rel, digest in sorted(expected.items()):
        full = model_dir / rel
        if not full.is_file():
            problems.append(f"missing file: {rel}")
        elif sha256_file(full) != digest:
            problems.append(f"changed file (SHA-256 differs from the lock): {rel}")
    for rel in _model_files(model_dir):
        if rel not in expected:
            problems.append(f"file not in the lock: {rel}")
    return problems

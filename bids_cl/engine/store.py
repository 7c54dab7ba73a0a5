"""The model store: unpack, check, lock and install models (and SynthStrip's weights).

Every way a model arrives goes through one check (``check_unpacked``) before bids_cl writes a lock for it:

* a lock file that came with the files (anywhere in the archive or folder) must verify, or the model is
  refused; the files then count as from a known source;
* every checkpoint must load with ``weights_only=True`` and the allow-list (``bids_cl.engine.checkpoints``),
  so nothing that would need full unpickling is ever locked as trusted;
* a model that arrives without a lock (and without a checksum from its Zenodo record) is locked only
  after it loaded safely, and its lock says ``"origin": "unverified source"`` (so does its provenance).

``bids_cl-models install NAME --allow-unsafe-unpickling`` skips the safe load for that one named model
and records the permission in its lock; it is the only way full unpickling ever happens.

Installed models: ``$BIDS_CL_HOME/models/<name>/``. Archives given to ``--model x.zip``:
``$BIDS_CL_HOME/models/_archives/<sha256[:16]>/`` (unpacked once; a read-only home unpacks per process).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bids_cl.engine import registry
from bids_cl.engine.checkpoints import load_checkpoint
from bids_cl.engine.lockfile import LOCK_NAME, file_digest, read_lock_file, verify_lock_file, write_lock_file
from bids_cl.engine.store_layout import find_model_folder, fold_checkpoints
from bids_cl.engine.store_zenodo import check_checksum, download, pick_archive, zenodo_files
from bids_cl.errors import (
    EXIT_BAD_DATA,
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_MISSING_INPUT,
    EXIT_USAGE,
    BidsClError,
)

log = logging.getLogger("bids_cl.engine")

UNVERIFIED = "unverified source"
ARCHIVES = "_archives"
UNSAFE_KEY = "unsafe_unpickling"  # lock source key set only by install --allow-unsafe-unpickling

_TEMP_DIRS: list[str] = []


def _cleanup_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


atexit.register(_cleanup_temp_dirs)


# ---------------------------------------------------------------- checks

def safe_extract_zip(archive: Path, dest: Path) -> list[str]:
    """Unpack ``archive`` into ``dest``, refusing absolute paths, ``..`` and links (zip-slip)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    names = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = (root / info.filename).resolve()
                if not str(target).startswith(str(root) + os.sep) and target != root:
                    raise BidsClError(f"refusing archive {archive}: member {info.filename!r} would be "
                                      "written outside the install folder", EXIT_BAD_DATA)
                # Unix mode bits live in the high 16 bits of external_attr; 0o12 = symbolic link.
                if (info.external_attr >> 28) == 0o12:
                    raise BidsClError(f"refusing archive {archive}: member {info.filename!r} is a link",
                                      EXIT_BAD_DATA)
                names.append(info.filename)
            zf.extractall(root)
    except zipfile.BadZipFile as exc:
        raise BidsClError(f"{archive} is not a valid zip archive: {exc}", EXIT_BAD_DATA) from exc
    return names


def verified(folder: Path, what: str) -> None:
    """Raise ``BidsClError`` (65) unless ``folder``'s lock file matches its files."""
    problems = verify_lock_file(folder)
    if problems:
        shown = "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        raise BidsClError(f"refusing {what}: its files do not match the lock file ({shown}). "
                          "Reinstall the model (checkpoints are only loaded when intact).", EXIT_BAD_DATA)


def check_unpacked(root: Path, what: str, *, allow_unsafe_unpickling: bool = False) -> dict[str, Any]:
    """Check a model tree before bids_cl locks it; returns what the lock's ``source`` should record.

    Every lock file found in the tree must verify; every fold checkpoint must load safely (unless the
    user allowed full unpickling for this model). ``origin`` is ``"lock in archive"`` when a lock came
    with the files, else ``"unverified source"``.
    """
    root = Path(root)
    model_dir = find_model_folder(root)
    locks = sorted(p.parent for p in root.rglob(LOCK_NAME))
    for folder in locks:
        verified(folder, f"{what} (lock {folder.relative_to(root).as_posix() or '.'}/{LOCK_NAME})")
    if allow_unsafe_unpickling:
        log.warning("UNSAFE: %s is installed without the safe-load check; its checkpoints will be fully "
                    "unpickled, which can run code from them", what)
    else:
        for fold, checkpoint in fold_checkpoints(model_dir).items():
            load_checkpoint(checkpoint, what=f"fold {fold} checkpoint of {what}")
    info: dict[str, Any] = {"origin": "lock in archive" if locks else UNVERIFIED}
    if locks:
        info["archive_locks"] = [(f.relative_to(root) / LOCK_NAME).as_posix() for f in locks]
    return info


def origin_of(lock_dir: Path | None) -> str:
    """``"unverified source"`` for a model bids_cl locked itself after it arrived without a lock (or
    any folder without a lock); otherwise the recorded origin, ``"lock"`` by default."""
    if lock_dir is None:
        return UNVERIFIED
    return str(lock_source(lock_dir).get("origin") or "lock")


def lock_source(model_root: Path) -> dict[str, Any]:
    """The ``source`` block of a model's lock (empty without a lock)."""
    lock = read_lock_file(model_root)
    return dict((lock or {}).get("source") or {})


def _staging(parent: Path, prefix: str) -> Path:
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        raise BidsClError(f"cannot write to {parent} (set {registry.HOME_ENV}): {exc}",
                          EXIT_CANNOT_CREATE_OUTPUT) from exc


# ---------------------------------------------------------------- --model x.zip

def unpack_archive(archive: Path) -> Path:
    """Unpack a user's zip once into ``$BIDS_CL_HOME/models/_archives/<sha256[:16]>`` after
    ``check_unpacked``; the caller verifies the lock as for any model. A refused archive leaves nothing."""
    archive = Path(archive)
    digest = file_digest(archive)
    cache = registry.models_home() / ARCHIVES / digest[:16]
    if (cache / LOCK_NAME).is_file():
        return cache
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=cache.parent))
    except OSError:
        # Read-only home (container): unpack for this process only.
        staging = Path(tempfile.mkdtemp(prefix="bids_cl_model."))
        _TEMP_DIRS.append(str(staging))
        cache = staging
    try:
        safe_extract_zip(archive, staging)
        info = check_unpacked(staging, f"the model in {archive}")
        write_lock_file(staging, source={"archive": archive.name, "archive_sha256": digest, **info})
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if staging != cache:
        try:
            os.replace(staging, cache)
        except OSError:  # another process unpacked the same archive first
            shutil.rmtree(staging, ignore_errors=True)
    return cache


# ---------------------------------------------------------------- install

def _refuse_reinstall(name: str, dest: Path, force: bool) -> None:
    spec = registry.REGISTRY.get(name)
    if spec is not None and spec.packaged:
        raise BidsClError(f"'{name}' ships with bids_cl and cannot be installed", EXIT_USAGE)
    if dest.exists() and not force:
        raise BidsClError(f"'{name}' is already installed in {dest} (use --force to replace it)",
                          EXIT_CANNOT_CREATE_OUTPUT)


def _move_into_place(staging: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(staging, dest)


def install_from_file(name: str, archive: str | Path, *, source: dict[str, Any] | None = None,
                      force: bool = False, allow_unsafe_unpickling: bool = False,
                      checksum_verified: bool = False) -> Path:
    """Unpack a model archive (``nnUNetv2_export_model_to_zip`` output) as model ``name``, check it
    (``check_unpacked``) and lock it. ``checksum_verified``: the archive matched its publisher's checksum
    (a Zenodo download), so a lock-less archive still has a known origin."""
    archive = Path(archive)
    if not archive.is_file():
        raise BidsClError(f"model archive not found: {archive}", EXIT_MISSING_INPUT)
    spec = registry.REGISTRY.get(name)
    if spec is not None and spec.kind != "segmentation":
        raise BidsClError(f"'{name}' is not a segmentation model: {registry.install_command(name)}",
                          EXIT_USAGE)
    dest = registry.installed_model_dir(name)
    _refuse_reinstall(name, dest, force)
    staging = _staging(registry.models_home(), f".{name}.")
    try:
        safe_extract_zip(archive, staging)
        info = dict(source or {})
        info.update(check_unpacked(staging, f"the archive {archive.name}",
                                   allow_unsafe_unpickling=allow_unsafe_unpickling))
        if checksum_verified and info["origin"] == UNVERIFIED:
            info["origin"] = "publisher checksum"
        info.setdefault("archive", archive.name)
        info["archive_sha256"] = file_digest(archive)
        info["archive_md5"] = file_digest(archive, "md5")  # what Zenodo lists, to compare by hand
        info["name"] = name
        if allow_unsafe_unpickling:
            info[UNSAFE_KEY] = True
        write_lock_file(staging, source=info)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("installed model %s into %s", name, dest)
    return dest


def install_from_zenodo(name: str, *, file: str | None = None, force: bool = False,
                        progress: bool = True, allow_unsafe_unpickling: bool = False) -> Path:
    """List the model's Zenodo record, download its zip, verify the checksum, then install it."""
    spec = registry.REGISTRY.get(name)
    if spec is None or not spec.zenodo_record:
        known = ", ".join(n for n, s in registry.REGISTRY.items() if s.zenodo_record)
        raise BidsClError(f"no download source is known for '{name}' (downloadable: {known}); "
                          "use --from-file for a local archive", EXIT_USAGE)
    _refuse_reinstall(name, registry.installed_model_dir(name), force)
    meta, files = zenodo_files(spec.zenodo_record)
    entry = pick_archive(files, file)
    home = registry.models_home()
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=home) as tmp:
        archive = download(entry["url"], Path(tmp) / Path(entry["key"]).name, size=entry.get("size"),
                           progress=progress)
        checked = check_checksum(archive, entry.get("checksum"))
        source = {"doi": spec.doi, "zenodo_record": spec.zenodo_record, "url": entry["url"],
                  "archive": entry["key"], "record_title": meta.get("title"),
                  "record_version": meta.get("version"), "license": meta.get("license")}
        return install_from_file(name, archive, source=source, force=force,
                                 allow_unsafe_unpickling=allow_unsafe_unpickling, checksum_verified=checked)


def install_weights_file(name: str, src: str | Path, *, filename: str, check: Callable[[Path], Any],
                         source: dict[str, Any] | None = None, force: bool = False) -> Path:
    """Install one weights file (SynthStrip's) as ``$BIDS_CL_HOME/models/<name>/<filename>``, locked.

    ``check(path)`` must load the staged copy safely (and raise ``BidsClError`` otherwise) before the
    lock is written; a refused file leaves nothing behind.
    """
    src = Path(src).expanduser()
    if not src.is_file():
        raise BidsClError(f"weights file not found: {src}", EXIT_MISSING_INPUT)
    dest = registry.installed_model_dir(name)
    _refuse_reinstall(name, dest, force)
    staging = _staging(registry.models_home(), f".{name}.")
    try:
        shutil.copyfile(src, staging / filename)
        check(staging / filename)
        info = {"origin": UNVERIFIED, **(source or {}), "file": src.name, "copied_from": str(src),
                "name": name}
        write_lock_file(staging, source=info)
        _move_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("installed %s into %s", name, dest)
    return dest / filename


def verify_installed(name: str) -> list[str]:
    """Problems of an installed model against its lock (empty: intact)."""
    folder = registry.installed_model_dir(name)
    return verify_lock_file(folder) if folder.is_dir() else [f"not installed ({folder})"]

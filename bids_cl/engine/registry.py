"""Known models, where installed models live, and how they get there.

Installed models live in ``$BIDS_CL_HOME/models/<name>/`` (default ``~/.cache/bids_cl``), each with a lock
file (``bids_cl_lock.json``). ``install`` downloads from the model's Zenodo record (the file list comes from
the Zenodo REST API, so the archive name need not be known in advance) or unpacks a local archive
(``--from-file``, for offline HPC nodes). A participant run never downloads: ``resolve`` of a missing model
raises an error that prints the install command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_cl.engine.lockfile import LOCK_NAME, read_lock_file, write_lock_file
from bids_cl.errors import (
    EXIT_BAD_DATA,
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_FAILURE,
    EXIT_MISSING_INPUT,
    EXIT_USAGE,
    BidsClError,
)

log = logging.getLogger("bids_cl.engine")

HOME_ENV = "BIDS_CL_HOME"
ZENODO_API_ENV = "BIDS_CL_ZENODO_API"
ZENODO_API_DEFAULT = "https://zenodo.org/api"
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A model bids_cl knows by name."""

    name: str
    description: str
    doi: str | None = None
    zenodo_record: str | None = None
    packaged: bool = False  # shipped inside the bids_cl package (bids_cl/data/models/<name>)
    citation: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


PUBLISHED_MODEL = "molchanova2025"
DEMO_MODEL = "demo"
# Names users type: "published" is the paper's model whatever its registry key.
ALIASES = {"published": PUBLISHED_MODEL}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)

REGISTRY: dict[str, ModelSpec] = {
    PUBLISHED_MODEL: ModelSpec(
        name=PUBLISHED_MODEL,
        description=("nnU-Net v2 3d_fullres cortical lesion model of Molchanova et al. (multi-site, 3T/7T, "
                     "skull-stripped MP2RAGE UNI or MPRAGE, one T1w channel)"),
        doi="10.5281/zenodo.15911797",
        zenodo_record="15911797",
        citation=("Molchanova N. et al., A comparative study of deep learning for cortical lesion MRI "
                  "segmentation with explainability analysis in multiple sclerosis. NeuroImage: Clinical "
                  "50:104007 (2026); arXiv 2507.12092"),
        notes=("Check the licence of the weights (shown by 'bids_cl-models info') before redistributing.",),
    ),
    DEMO_MODEL: ModelSpec(
        name=DEMO_MODEL,
        description="Tiny demonstration model trained on synthetic phantoms (ships with bids_cl)",
        packaged=True,
    ),
}


def bids_cl_home() -> Path:
    """``$BIDS_CL_HOME`` or ``~/.cache/bids_cl``."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bids_cl"


def models_home() -> Path:
    return bids_cl_home() / "models"


def packaged_model_dir(name: str) -> Path:
    """Where a model shipped as package data lives (it may not exist in a given build)."""
    return Path(__file__).resolve().parents[1] / "data" / "models" / name


def installed_model_dir(name: str) -> Path:
    """The install folder of ``name`` (packaged models: the package-data folder)."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.packaged:
        return packaged_model_dir(name)
    return models_home() / name


def is_installed(name: str) -> bool:
    return (installed_model_dir(name) / LOCK_NAME).is_file()


def install_command(name: str) -> str:
    """What to run to make ``name`` available (printed by the missing-model error)."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.packaged:
        return "reinstall bids_cl (the packaged model is missing from this installation)"
    return (f"bids_cl-models install {name}   (offline: bids_cl-models install {name} "
            f"--from-file <downloaded.zip>)")


def list_models() -> list[dict[str, Any]]:
    """Registry entries and locally installed models, for ``bids_cl-models list``."""
    rows = []
    names = list(REGISTRY)
    if models_home().is_dir():
        names += sorted(p.name for p in models_home().iterdir()
                        if p.is_dir() and not p.name.startswith((".", "_")) and p.name not in REGISTRY)
    for name in names:
        spec = REGISTRY.get(name)
        folder = installed_model_dir(name)
        installed = (folder / LOCK_NAME).is_file()
        if spec is not None and spec.packaged and folder.is_dir() and not installed:
            status = "present but not locked"
        else:
            status = "installed" if installed else "not available"
        rows.append({
            "name": name,
            "status": status,
            "path": str(folder),
            "description": spec.description if spec else "installed from a local archive",
            "doi": spec.doi if spec else None,
        })
    return rows


# ---------------------------------------------------------------- archives

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


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def install_from_file(name: str, archive: str | Path, *, source: dict[str, Any] | None = None,
                      force: bool = False) -> Path:
    """Unpack a model archive (``nnUNetv2_export_model_to_zip`` output) as model ``name``; lock it."""
    from bids_cl.engine.models import find_model_folder  # late: models imports this module

    archive = Path(archive)
    if not archive.is_file():
        raise BidsClError(f"model archive not found: {archive}", EXIT_MISSING_INPUT)
    spec = REGISTRY.get(name)
    if spec is not None and spec.packaged:
        raise BidsClError(f"'{name}' ships with bids_cl and cannot be installed", EXIT_USAGE)
    dest = installed_model_dir(name)
    if dest.exists() and not force:
        raise BidsClError(f"model '{name}' is already installed in {dest} (use --force to replace it)",
                          EXIT_CANNOT_CREATE_OUTPUT)
    try:
        models_home().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=models_home()))
    except OSError as exc:
        raise BidsClError(f"cannot write to {models_home()} (set {HOME_ENV}): {exc}",
                          EXIT_CANNOT_CREATE_OUTPUT) from exc
    try:
        safe_extract_zip(archive, staging)
        find_model_folder(staging)  # fail now, not at the first participant run
        info = dict(source or {})
        info.setdefault("archive", archive.name)
        info["archive_sha256"] = file_digest(archive)
        info["name"] = name
        write_lock_file(staging, source=info)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("installed model %s into %s", name, dest)
    return dest


# ---------------------------------------------------------------- Zenodo

def zenodo_api() -> str:
    return os.environ.get(ZENODO_API_ENV, ZENODO_API_DEFAULT).rstrip("/")


def _get_json(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": "bids_cl-models"})
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            return json.loads(resp.read().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise BidsClError(f"cannot read the Zenodo record {url}: {exc}. Offline? Download the archive "
                          "elsewhere and use --from-file.", EXIT_FAILURE) from exc


def zenodo_files(record: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(record metadata, files) of a Zenodo record; each file has key, size, checksum, url."""
    data = _get_json(f"{zenodo_api()}/records/{record}")
    entries = data.get("files") or []
    if isinstance(entries, dict):  # InvenioRDM may nest them as {"entries": {...}}
        entries = list((entries.get("entries") or {}).values())
    files = []
    for entry in entries:
        links = entry.get("links") or {}
        key = entry.get("key") or entry.get("filename")
        url = links.get("content") or links.get("download") or links.get("self")
        if not key or not url:
            continue
        files.append({"key": key, "size": entry.get("size"), "checksum": entry.get("checksum"),
                      "url": url})
    meta = data.get("metadata") or {}
    licence = meta.get("license") or meta.get("rights")
    if isinstance(licence, dict):
        licence = licence.get("id") or licence.get("title")
    elif isinstance(licence, list) and licence:
        licence = licence[0].get("id") if isinstance(licence[0], dict) else licence[0]
    return {"title": meta.get("title"), "version": meta.get("version"), "license": licence,
            "doi": data.get("doi") or meta.get("doi")}, files


def pick_archive(files: list[dict[str, Any]], wanted: str | None = None) -> dict[str, Any]:
    """The zip to install: ``wanted`` by name, else the only zip, else a clear error listing them."""
    if wanted:
        for entry in files:
            if entry["key"] == wanted:
                return entry
        raise BidsClError(f"the record has no file {wanted!r}; files: "
                          + ", ".join(e["key"] for e in files), EXIT_USAGE)
    zips = [e for e in files if e["key"].lower().endswith(".zip")]
    if len(zips) == 1:
        return zips[0]
    if not zips:
        raise BidsClError("the record has no .zip file; files: " + ", ".join(e["key"] for e in files),
                          EXIT_MISSING_INPUT)
    raise BidsClError("the record has several zip files, choose one with --file: "
                      + ", ".join(e["key"] for e in zips), EXIT_USAGE)


def download(url: str, dest: Path, *, size: int | None = None, progress: bool = True) -> Path:
    """Stream ``url`` into ``dest`` (via ``dest.part``) with a progress bar on stderr."""
    from tqdm import tqdm

    part = dest.with_name(dest.name + ".part")
    request = urllib.request.Request(url, headers={"User-Agent": "bids_cl-models"})
    try:
        with urllib.request.urlopen(request, timeout=_DOWNLOAD_TIMEOUT_S) as resp, \
                open(part, "wb") as out:
            total = size or int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress, file=sys.stderr) as bar:
                for block in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(block)
                    bar.update(len(block))
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise BidsClError(f"download of {url} failed: {exc}", EXIT_FAILURE) from exc
    os.replace(part, dest)
    return dest


def _check_checksum(path: Path, checksum: str | None) -> None:
    """Zenodo publishes ``md5:<hex>``; a mismatch means a broken or altered download."""
    if not checksum or ":" not in checksum:
        return
    algorithm, expected = checksum.split(":", 1)
    if algorithm.lower() not in hashlib.algorithms_available:
        return
    actual = file_digest(path, algorithm.lower())
    if actual != expected.lower():
        raise BidsClError(f"checksum mismatch for {path.name}: {algorithm} {actual} != {expected}",
                          EXIT_BAD_DATA)


def install_from_zenodo(name: str, *, file: str | None = None, force: bool = False,
                        progress: bool = True) -> Path:
    """List the model's Zenodo record, download its zip, verify the checksum, unpack and lock."""
    spec = REGISTRY.get(name)
    if spec is None or not spec.zenodo_record:
        known = ", ".join(n for n, s in REGISTRY.items() if s.zenodo_record)
        raise BidsClError(f"no download source is known for '{name}' (downloadable: {known}); "
                          "use --from-file for a local archive", EXIT_USAGE)
    if installed_model_dir(name).exists() and not force:
        raise BidsClError(f"model '{name}' is already installed in {installed_model_dir(name)} "
                          "(use --force to replace it)", EXIT_CANNOT_CREATE_OUTPUT)
    meta, files = zenodo_files(spec.zenodo_record)
    entry = pick_archive(files, file)
    models_home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download.", dir=models_home()) as tmp:
        archive = download(entry["url"], Path(tmp) / Path(entry["key"]).name, size=entry.get("size"),
                           progress=progress)
        _check_checksum(archive, entry.get("checksum"))
        source = {"doi": spec.doi, "zenodo_record": spec.zenodo_record, "url": entry["url"],
                  "archive": entry["key"], "record_title": meta.get("title"),
                  "record_version": meta.get("version"), "license": meta.get("license")}
        return install_from_file(name, archive, source=source, force=force)


def lock_source(model_root: Path) -> dict[str, Any]:
    """The ``source`` block of a model's lock (empty without a lock)."""
    lock = read_lock_file(model_root)
    return dict((lock or {}).get("source") or {})

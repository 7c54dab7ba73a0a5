"""Zenodo: list a record's files through the REST API and download one, with its published checksum.

The record's file list comes from the API, so the archive's name need not be known in advance. Used by
``bids_cl-models install NAME`` (``bids_cl.engine.store``); nothing else in bids_cl touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from bids_cl.engine.lockfile import file_digest
from bids_cl.errors import EXIT_BAD_DATA, EXIT_FAILURE, EXIT_MISSING_INPUT, EXIT_USAGE, BidsClError

ZENODO_API_ENV = "BIDS_CL_ZENODO_API"
ZENODO_API_DEFAULT = "https://zenodo.org/api"
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


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


def check_checksum(path: Path, checksum: str | None) -> bool:
    """Zenodo publishes ``md5:<hex>``; a mismatch means a broken or altered download (exit 65).

    True when the file was checked, False when the record gives no checksum bids_cl can compute.
    """
    if not checksum or ":" not in checksum:
        return False
    algorithm, expected = checksum.split(":", 1)
    if algorithm.lower() not in hashlib.algorithms_available:
        return False
    actual = file_digest(path, algorithm.lower())
    if actual != expected.lower():
        raise BidsClError(f"checksum mismatch for {path.name}: {algorithm} {actual} != {expected}",
                          EXIT_BAD_DATA)
    return True

"""Atomic file writing: a killed run never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Every temporary file bids_cl writes starts with this, so that a rerun finds and removes what a killed
# run (kill -9, a full disk, a node lost) left behind: ``remove_stale_temporaries``.
TMP_PREFIX = ".bids_cl-tmp."


def atomic_write(path: Path, writer: Callable[[Path], None], *, suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the destination folder so the final ``os.replace`` is a same-filesystem
    rename (atomic on POSIX); concurrent writers of *different* files never collide because each temp
    name is unique. It is removed on every exit path Python sees; what a kill -9 leaves is named with
    :data:`TMP_PREFIX` and swept by the next run.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=suffix or _suffix(path),
                                    dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _suffix(path: Path) -> str:
    # Keep the real extension so writers that infer the format from it (nibabel) behave.
    name = path.name
    for ext in (".nii.gz", ".tsv.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n"
    return atomic_write_text(path, text)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


NIFTI_GZIP_LEVEL = 1


def atomic_save_nifti(img: Any, path: Path) -> Path:
    """Save a nibabel image atomically, with a deterministic gzip header (no timestamp, no name).

    The image is streamed into the gzip file of the one temporary: no uncompressed intermediate file
    exists that a killed run could leave behind.
    """
    import gzip

    path = Path(path)

    def _write(tmp: Path) -> None:
        if path.name.endswith(".gz"):
            # mtime=0 and no file name in the header: byte-identical reruns. Level 1, nibabel's own default:
            # gzip's default 9 took 3-9x longer on float maps (1.3 s vs 0.15 s for a 1 mm brain) for files
            # 2-9 % smaller.
            with open(tmp, "wb") as dst, gzip.GzipFile(filename="", mode="wb", fileobj=dst, mtime=0,
                                                        compresslevel=NIFTI_GZIP_LEVEL) as gz:
                img.to_file_map(img.make_file_map({"image": gz, "header": gz}))
        else:
            img.to_filename(str(tmp))

    return atomic_write(path, _write)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed run left in ``folder`` (not below it); returns what was removed."""
    removed = []
    for stale in Path(folder).glob(f"{TMP_PREFIX}*"):
        if stale.is_file():
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed

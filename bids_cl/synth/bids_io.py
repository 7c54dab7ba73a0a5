"""File side of the phantoms: deterministic NIfTI/JSON/TSV writing and BIDS names.

Same seed -> byte-identical dataset: NIfTI files are built in memory and gzipped with mtime 0 and no
file name in the gzip header; JSON keeps insertion order; numbers in TSVs have fixed decimals.
"""

from __future__ import annotations

import gzip
import io
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

#: on-disk encodings of the intensity images (the ``--dtype`` knob)
IMAGE_DTYPES = ("uint16", "int16", "float32")
#: int16 images store physical / INT16_SLOPE so that a reader must apply scl_slope (0..4095 -> 0..32760)
INT16_SLOPE = 0.125

_GZIP_LEVEL = 1  # speed over size: phantoms are rewritten on every run


def encode_image(physical: np.ndarray, dtype: str) -> tuple[np.ndarray, float, float]:
    """(raw array, scl_slope, scl_inter) for an intensity image in physical units (0..4095)."""
    if dtype == "uint16":
        return np.clip(np.rint(physical), 0, 65535).astype(np.uint16), 1.0, 0.0
    if dtype == "int16":
        raw = np.clip(np.rint(physical / INT16_SLOPE), -32768, 32767).astype(np.int16)
        return raw, INT16_SLOPE, 0.0
    if dtype == "float32":
        return physical.astype(np.float32), 1.0, 0.0
    raise ValueError(f"unknown image dtype {dtype!r}; choose from {IMAGE_DTYPES}")


def nifti_bytes(raw: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bytes:
    """Uncompressed NIfTI-1 bytes; qform and sform both hold ``affine`` (code 1, scanner)."""
    img = nib.Nifti1Image(raw, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    buf = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=buf), "header": nib.FileHolder(fileobj=buf)})
    data = bytearray(buf.getvalue())
    # nibabel resets the scaling of integer data it does not have to scale; set it ourselves
    # (scl_slope, scl_inter are the float32 fields at byte 112 and 116 of the header)
    struct.pack_into(img.header.endianness + "ff", data, 112, slope, inter)
    return bytes(data)


def write_gz(path: Path, payload: bytes) -> None:
    """gzip with a fixed header (mtime 0, no name) so that equal content gives equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh, gzip.GzipFile(
        filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=_GZIP_LEVEL
    ) as gz:
        gz.write(payload)


def write_image(path: Path, physical: np.ndarray, affine: np.ndarray, dtype: str) -> None:
    raw, slope, inter = encode_image(physical, dtype)
    write_gz(path, nifti_bytes(raw, affine, slope, inter))


def write_label(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """Masks (bool) as uint8, label maps as int16, unscaled."""
    dtype = np.uint8 if labels.dtype == bool else np.int16
    write_gz(path, nifti_bytes(labels.astype(dtype), affine))


def write_json(path: Path, content: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3f}"
    return str(value)


def write_tsv(path: Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)]
    lines += ["\t".join(_cell(row.get(c)) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# names


def entity_prefix(subject: str, session: str | None, acq: str | None = None) -> str:
    parts = [f"sub-{subject}"]
    if session is not None:
        parts.append(f"ses-{session}")
    if acq:
        parts.append(f"acq-{acq}")
    return "_".join(parts)


def anat_dir(root: Path, subject: str, session: str | None) -> Path:
    folder = root / f"sub-{subject}"
    if session is not None:
        folder = folder / f"ses-{session}"
    return folder / "anat"


def mp2rage_names(
    subject: str, session: str | None, *, both: bool, uni_as_t1w: bool
) -> dict[str, str]:
    """File stems of one MP2RAGE acquisition: keys ``uni``, ``inv1``, ``inv2``, ``prefix``."""
    acq = "mp2rage" if both else None
    base = entity_prefix(subject, session, acq)
    if uni_as_t1w:
        prefix = entity_prefix(subject, session, "UNI")
        uni = f"{prefix}_T1w"
    else:
        prefix, uni = base, f"{base}_UNIT1"
    return {
        "uni": uni,
        "inv1": f"{base}_inv-1_part-mag_MP2RAGE",
        "inv2": f"{base}_inv-2_part-mag_MP2RAGE",
        "prefix": prefix,
    }


def mprage_names(subject: str, session: str | None, *, both: bool) -> dict[str, str]:
    prefix = entity_prefix(subject, session, "mprage" if both else None)
    return {"t1w": f"{prefix}_T1w", "prefix": prefix}

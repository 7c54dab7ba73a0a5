"""Shared test helpers: tiny BIDS layouts built on the fly (no network, no downloaded data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

os.environ.setdefault("NIPYPE_NO_ET", "1")


def write_nifti(path: Path, shape: tuple[int, ...] = (12, 12, 12), value: float = 100.0,
                affine: np.ndarray | None = None) -> Path:
    """A small image: ``value`` inside a centred block, 0 around it (a constant image has no signal)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.zeros(shape, dtype=np.float32)
    inner = tuple(slice(n // 4, n - n // 4) if n > 3 else slice(None) for n in shape[:3])
    data[inner] = value
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def write_bids(root: Path, files: dict[str, dict[str, Any] | None], *,
               participants: list[str] | None = None) -> Path:
    """Create a BIDS dataset: ``files`` maps relative NIfTI paths to sidecar metadata (or None).

    A value of ``{"__empty__": True}`` writes a 0-byte file instead of an image.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "test", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    (root / "README").write_text("A tiny dataset built by the bids_cl tests.\n")
    subjects = sorted({p.split("/")[0] for p in files})
    lines = ["participant_id"] + (participants or subjects)
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    for rel, meta in files.items():
        path = root / rel
        meta = dict(meta or {})
        if meta.pop("__empty__", False):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        else:
            write_nifti(path)
        if meta:
            sidecar = Path(str(path).replace(".nii.gz", ".json"))
            sidecar.write_text(json.dumps(meta))
    return root


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real ``bids_cl`` command line in a subprocess."""
    full_env = {**os.environ, "NIPYPE_NO_ET": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bids_cl", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=full_env, timeout=timeout, check=False,
    )


@pytest.fixture
def mp2rage_dataset(tmp_path: Path) -> Path:
    """UNIT1 + inv-1/inv-2 (mag and phase) + T1map, one participant, one session."""
    anat = "sub-01/ses-01/anat/sub-01_ses-01"
    meta = {"MagneticFieldStrength": 7, "PulseSequenceType": "MP2RAGE"}
    return write_bids(tmp_path / "bids", {
        f"{anat}_UNIT1.nii.gz": meta,
        f"{anat}_inv-1_part-mag_MP2RAGE.nii.gz": {**meta, "InversionTime": 0.8},
        f"{anat}_inv-1_part-phase_MP2RAGE.nii.gz": {**meta, "InversionTime": 0.8},
        f"{anat}_inv-2_part-mag_MP2RAGE.nii.gz": {**meta, "InversionTime": 2.7},
        f"{anat}_inv-2_part-phase_MP2RAGE.nii.gz": {**meta, "InversionTime": 2.7},
        f"{anat}_T1map.nii.gz": meta,
    })


@pytest.fixture(scope="session")
def real_derivatives(tmp_path_factory: pytest.TempPathFactory):
    """Derivatives of a real participant run on tiny phantoms (tests/derivatives_fixture.py), built once
    per session and shared by the xdist workers; read-only: use ``.copy_output(tmp)`` to change them."""
    from derivatives_fixture import shared_derivatives

    return shared_derivatives(tmp_path_factory)

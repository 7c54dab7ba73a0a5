"""Names and places: the models bids_cl knows by name, and where each one lives on disk.

Installed models live in ``$BIDS_CL_HOME/models/<name>/`` (default ``~/.cache/bids_cl``), each with a lock
file (``bids_cl_lock.json``); the demo model ships inside the package. SynthStrip's weights (FreeSurfer's,
which bids_cl may not redistribute) are installed the same way, as ``$BIDS_CL_HOME/models/synthstrip/``,
or found in a FreeSurfer installation. How models get there is ``bids_cl.engine.store``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bids_cl.engine.lockfile import LOCK_NAME

HOME_ENV = "BIDS_CL_HOME"


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
    kind: str = "segmentation"  # "segmentation" (an nnU-Net model) or "skullstrip" (SynthStrip weights)


PUBLISHED_MODEL = "molchanova2025"
DEMO_MODEL = "demo"
SYNTHSTRIP = "synthstrip"
SYNTHSTRIP_WEIGHTS = "synthstrip.1.pt"
FREESURFER_HOME_ENV = "FREESURFER_HOME"
# Where to get synthstrip.1.pt: FreeSurfer's licence does not let bids_cl ship or download it.
SYNTHSTRIP_SOURCES = (
    "a FreeSurfer >= 7.3 installation ($FREESURFER_HOME/models/synthstrip.1.pt), or the "
    "freesurfer/synthstrip container image (/freesurfer/models/synthstrip.1.pt; e.g. "
    "'apptainer exec docker://freesurfer/synthstrip cp /freesurfer/models/synthstrip.1.pt .')")
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
    SYNTHSTRIP: ModelSpec(
        name=SYNTHSTRIP,
        description="SynthStrip skull-stripping weights (FreeSurfer's synthstrip.1.pt, used by "
                    "--skull-strip auto/synthstrip)",
        citation=("Hoopes A. et al., SynthStrip: skull-stripping for any brain image. NeuroImage 260:119474 "
                  "(2022)"),
        kind="skullstrip",
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


def installed_synthstrip() -> Path:
    """Where ``bids_cl-models install synthstrip`` puts the weights (whether or not they are there)."""
    return installed_model_dir(SYNTHSTRIP) / SYNTHSTRIP_WEIGHTS


def freesurfer_synthstrip() -> Path | None:
    """``$FREESURFER_HOME/models/synthstrip.1.pt`` when that file exists."""
    fs_home = os.environ.get(FREESURFER_HOME_ENV)
    if fs_home:
        path = Path(fs_home).expanduser() / "models" / SYNTHSTRIP_WEIGHTS
        if path.is_file():
            return path
    return None


def install_command(name: str) -> str:
    """What to run to make ``name`` available (printed by the missing-model error)."""
    spec = REGISTRY.get(name)
    if spec is not None and spec.packaged:
        return "reinstall bids_cl (the packaged model is missing from this installation)"
    if name == SYNTHSTRIP:
        return (f"bids_cl-models install {SYNTHSTRIP} --from-file {SYNTHSTRIP_WEIGHTS}   (get the file from "
                f"{SYNTHSTRIP_SOURCES})")
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
        path = str(folder)
        if spec is not None and spec.packaged and folder.is_dir() and not installed:
            status = "present but not locked"
        else:
            status = "installed" if installed else "not available"
        hint = None
        if name == SYNTHSTRIP and not installed:
            found = freesurfer_synthstrip()
            if found is not None:
                status, path = "in FreeSurfer", str(found)
            hint = (f"install: bids_cl-models install {SYNTHSTRIP} --from-file {SYNTHSTRIP_WEIGHTS} (from a "
                    "FreeSurfer >= 7.3 install or the freesurfer/synthstrip image)")
        rows.append({
            "name": name,
            "status": status,
            "path": path,
            "description": spec.description if spec else "installed from a local archive",
            "doi": spec.doi if spec else None,
            "kind": spec.kind if spec else "segmentation",
            "hint": hint,
        })
    return rows

"""Template images for spatial normalisation, read from a TemplateFlow home without touching the network.

Run time never calls ``templateflow.api.get``: on an offline compute node a 0-byte placeholder from
TemplateFlow's skeleton would trigger an S3 download attempt. We look for the files on disk ourselves and
fail fast (exit 66) with the command that prefetches them.

The default space, ``MNI152NLin2009aSym`` (ICBM 2009a nonlinear symmetric), needs no download at all:
nilearn ships that template's skull-stripped T1w and brain mask, and we copy them into the TemplateFlow
home on first use (``seed_nilearn_template``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bids_cl.errors import (
    EXIT_CANNOT_CREATE_OUTPUT,
    EXIT_FAILURE,
    EXIT_MISSING_INPUT,
    EXIT_USAGE,
    BidsClError,
)
from bids_cl.utils.cli import UsageParser, run_command

DEFAULT_SPACE = "MNI152NLin2009aSym"
# Spaces we can build offline from files that ship inside a Python package.
NILEARN_SPACES = {"MNI152NLin2009aSym"}
NILEARN_RESOLUTIONS = (1, 2)
PROVENANCE_NAME = "bids_cl-provenance.json"
FETCH_COMMAND = "bids_cl-fetch-templates"


@dataclass(frozen=True)
class TemplateFiles:
    """One template at one resolution: a T1w image and its brain mask (absolute paths)."""

    t1w: str
    mask: str
    source: str  # "templateflow" (files from TemplateFlow) or "nilearn <version>" (seeded by bids_cl)
    space: str = DEFAULT_SPACE
    resolution: int = 1
    skull_stripped: bool = True  # False when only the head T1w exists (e.g. MNI152NLin6Asym); mask it


def templateflow_home() -> Path:
    """The folder TemplateFlow would use: ``$TEMPLATEFLOW_HOME`` or its default user cache."""
    env = os.environ.get("TEMPLATEFLOW_HOME")
    if env:
        return Path(env).expanduser().absolute()
    from platformdirs import user_cache_dir  # the same default templateflow.conf uses

    return Path(user_cache_dir("templateflow")).absolute()


def parse_space(space: str, resolution: int = 1) -> tuple[str, str | None, int]:
    """Split NiPreps-style ``Name[:cohort-X][:res-N]`` into (name, cohort, resolution)."""
    name, *mods = space.split(":")
    cohort = None
    for mod in mods:
        key, _, value = mod.partition("-")
        if key == "cohort" and value:
            cohort = value
        elif key == "res" and value.isdigit():
            resolution = int(value)
        else:
            raise BidsClError(f"cannot parse template space {space!r} (modifier {mod!r})", EXIT_USAGE)
    if not re.fullmatch(r"[A-Za-z0-9]+", name):
        raise BidsClError(f"invalid template name {name!r}", EXIT_USAGE)
    return name, cohort, resolution


def _is_real_file(path: Path) -> bool:
    """A usable NIfTI: present, not a TemplateFlow 0-byte placeholder, not a saved S3 error page."""
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return head == b"\x1f\x8b" if path.name.endswith(".gz") else True


def _candidates(folder: Path, name: str, cohort: str | None, resolution: int,
                desc: str | None, suffix: str) -> list[Path]:
    """Files for one (desc, suffix) at ``resolution``, written ``res-1`` or ``res-01``."""
    if not folder.is_dir():
        return []
    coh = f"_cohort-{re.escape(cohort)}" if cohort else ""
    dsc = f"_desc-{desc}" if desc else ""
    pattern = re.compile(
        rf"tpl-{re.escape(name)}{coh}_res-0*{resolution}{dsc}_{suffix}\.nii(\.gz)?"
    )
    # Sorting puts res-01 before res-1: our own seeds win over TemplateFlow's for the same template.
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and _is_real_file(p))


def find_template(space: str = DEFAULT_SPACE, *, resolution: int = 1,
                  home: Path | None = None) -> TemplateFiles | None:
    """Look for the template on disk only; ``None`` when a file is missing. Never downloads."""
    name, cohort, resolution = parse_space(space, resolution)
    home = home or templateflow_home()
    folder = home / f"tpl-{name}"
    masks = _candidates(folder, name, cohort, resolution, "brain", "mask")
    if not masks:
        return None
    brains = _candidates(folder, name, cohort, resolution, "brain", "T1w")
    heads = _candidates(folder, name, cohort, resolution, None, "T1w")
    if not brains and not heads:
        return None
    t1w = brains[0] if brains else heads[0]
    provenance = _read_provenance(folder)
    source = "templateflow"
    if t1w.name in provenance.get("Files", {}):
        source = provenance.get("Source", "nilearn")
    return TemplateFiles(
        t1w=str(t1w), mask=str(masks[0]), source=source,
        space=f"{name}:cohort-{cohort}" if cohort else name, resolution=resolution,
        skull_stripped=bool(brains),
    )


def nilearn_template(resolution: int = 1):  # -> tuple[nib.Nifti1Image, nib.Nifti1Image]
    """nilearn's packaged ICBM 2009a symmetric brain: (T1w with zero background, uint8 mask).

    nilearn's 2 mm T1w is blurred past the brain edge, so the T1w is multiplied by the mask at both
    resolutions to make a clean ``desc-brain`` image.
    """
    import nibabel as nib
    from nilearn import datasets

    if resolution not in NILEARN_RESOLUTIONS:
        raise BidsClError(
            f"nilearn ships {DEFAULT_SPACE} only at resolutions {NILEARN_RESOLUTIONS}, not {resolution}",
            EXIT_USAGE,
        )
    t1 = datasets.load_mni152_template(resolution=resolution)
    mask_img = datasets.load_mni152_brain_mask(resolution=resolution)
    mask = np.asarray(mask_img.dataobj) > 0
    brain = np.where(mask, t1.get_fdata(dtype=np.float32), 0).astype(np.float32)
    t1_out = nib.Nifti1Image(brain, t1.affine)
    mask_out = nib.Nifti1Image(mask.astype(np.uint8), mask_img.affine)
    for img in (t1_out, mask_out):
        img.header.set_xyzt_units("mm")
        # Template images are in MNI space: tell readers so (sform/qform code 4 = MNI152).
        img.set_sform(img.affine, code=4)
        img.set_qform(img.affine, code=4)
    return t1_out, mask_out


def seed_nilearn_template(home: Path | None = None,
                          resolutions: Iterable[int] = NILEARN_RESOLUTIONS) -> list[Path]:
    """Write nilearn's MNI152NLin2009aSym brain and mask into ``home`` (atomic; idempotent)."""
    import nilearn

    from bids_cl.utils.io import atomic_save_nifti, atomic_write_json

    home = home or templateflow_home()
    folder = home / f"tpl-{DEFAULT_SPACE}"
    written: list[Path] = []
    seeded: dict[str, str] = _read_provenance(folder).get("Files", {})
    try:
        for res in resolutions:
            stem = f"tpl-{DEFAULT_SPACE}_res-{res:02d}_desc-brain"
            t1_path, mask_path = folder / f"{stem}_T1w.nii.gz", folder / f"{stem}_mask.nii.gz"
            if not (_is_real_file(t1_path) and _is_real_file(mask_path)):
                t1_img, mask_img = nilearn_template(res)
                atomic_save_nifti(t1_img, t1_path)
                atomic_save_nifti(mask_img, mask_path)
                written += [t1_path, mask_path]
            seeded[t1_path.name] = f"nilearn.datasets.load_mni152_template(resolution={res})"
            seeded[mask_path.name] = f"nilearn.datasets.load_mni152_brain_mask(resolution={res})"
        if written or not (folder / PROVENANCE_NAME).is_file():
            atomic_write_json(folder / PROVENANCE_NAME, {
                "Source": f"nilearn {nilearn.__version__}",
                "Template": "ICBM 2009a Nonlinear Symmetric (mni_icbm152_t1_tal_nlin_sym_09a), "
                            "as packaged by nilearn; T1w multiplied by the brain mask",
                "Files": seeded,
                "Note": "Written by bids_cl because the template was not in this TemplateFlow home. "
                        "These names are not TemplateFlow's own (it has res-1 files for this template).",
            })
    except OSError as exc:
        raise BidsClError(
            f"cannot write the {DEFAULT_SPACE} template into TEMPLATEFLOW_HOME={home} ({exc}); set "
            f"TEMPLATEFLOW_HOME to a writable folder or run '{FETCH_COMMAND} --tf-dir {home}' once "
            "where it is writable", EXIT_CANNOT_CREATE_OUTPUT,
        ) from exc
    return written


def _read_provenance(folder: Path) -> dict:
    try:
        return json.loads((folder / PROVENANCE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def fetch_command(spaces: Sequence[str], home: Path) -> str:
    return f"{FETCH_COMMAND} --tf-dir {home} " + " ".join(spaces)


def get_template(space: str = DEFAULT_SPACE, *, resolution: int = 1) -> TemplateFiles:
    """The template's T1w and brain mask, seeding nilearn's copy for the default space if needed.

    Raises ``BidsClError`` (66) with the prefetch command when another space is not on disk.
    """
    found = find_template(space, resolution=resolution)
    if found is not None:
        return found
    name, cohort, res = parse_space(space, resolution)
    home = templateflow_home()
    if name in NILEARN_SPACES and cohort is None and res in NILEARN_RESOLUTIONS:
        seed_nilearn_template(home, resolutions=[res])
        found = find_template(space, resolution=resolution)
        if found is not None:
            return found
    raise BidsClError(
        f"template {space} (res-{res}) not found in TEMPLATEFLOW_HOME={home} (run time never downloads); "
        f"prefetch it where there is network with: {fetch_command([space], home)}, then make that "
        "folder visible here and set TEMPLATEFLOW_HOME to it", EXIT_MISSING_INPUT,
    )


def check_templates(spaces: Iterable[str], *, resolution: int = 1) -> dict[str, TemplateFiles]:
    """Start-up check: every requested space is on disk (seeding the default one). Local files only."""
    spaces = list(dict.fromkeys(spaces))
    found: dict[str, TemplateFiles] = {}
    missing: list[str] = []
    for space in spaces:
        try:
            found[space] = get_template(space, resolution=resolution)
        except BidsClError as exc:
            if exc.code != EXIT_MISSING_INPUT:
                raise
            missing.append(space)
    if missing:
        home = templateflow_home()
        raise BidsClError(
            f"template(s) {', '.join(missing)} not found in TEMPLATEFLOW_HOME={home}; prefetch on a "
            f"node with network: {fetch_command(missing, home)} (then bind that folder and set "
            "TEMPLATEFLOW_HOME to it)", EXIT_MISSING_INPUT,
        )
    return found


# --- bids_cl-fetch-templates ------------------------------------------------------------------------


def _fetch_from_templateflow(space: str, resolution: int, home: Path) -> None:
    """Download one space's T1w (brain if it exists, else head) and brain mask with TemplateFlow."""
    from templateflow.client import TemplateFlowClient

    name, cohort, res = parse_space(space, resolution)
    client = TemplateFlowClient(root=home)
    extra = {"cohort": cohort} if cohort else {}
    query = dict(resolution=res, extension=".nii.gz", **extra)
    if not client.ls(name, desc="brain", suffix="mask", **query):
        raise BidsClError(f"TemplateFlow has no res-{res} brain mask for {space}", EXIT_MISSING_INPUT)
    client.get(name, desc="brain", suffix="mask", **query)
    if client.ls(name, desc="brain", suffix="T1w", **query):
        client.get(name, desc="brain", suffix="T1w", **query)
    else:
        client.get(name, desc=None, suffix="T1w", **query)


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog=FETCH_COMMAND,
        description="Put the template(s) bids_cl needs into a TemplateFlow home, for offline compute "
        f"nodes and containers. {DEFAULT_SPACE} is built offline from nilearn; other spaces are "
        "downloaded with TemplateFlow (needs network: run it on a login node).",
    )
    parser.add_argument("spaces", nargs="*", default=[DEFAULT_SPACE], metavar="SPACE",
                        help=f"TemplateFlow template names (default: {DEFAULT_SPACE})")
    parser.add_argument("--tf-dir", type=Path, default=None,
                        help="TemplateFlow home to fill (default: $TEMPLATEFLOW_HOME or "
                        "~/.cache/templateflow)")
    parser.add_argument("--resolution", type=int, nargs="+", default=[1, 2],
                        help="resolutions to fetch (default: 1 2; missing ones are skipped for "
                        "downloaded spaces)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bids_cl-fetch-templates``; returns the exit code."""
    return run_command(FETCH_COMMAND, lambda: _main(argv))


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    home = (args.tf_dir or templateflow_home()).expanduser().absolute()
    # templateflow reads the variable at import: set it before anything imports it.
    os.environ["TEMPLATEFLOW_HOME"] = str(home)
    try:
        home.mkdir(parents=True, exist_ok=True)
        for space in args.spaces:
            name, cohort, _ = parse_space(space)
            got = []
            for res in args.resolution:
                if find_template(space, resolution=res, home=home) is None:
                    if name in NILEARN_SPACES and cohort is None and res in NILEARN_RESOLUTIONS:
                        seed_nilearn_template(home, resolutions=[res])
                    else:
                        try:
                            _fetch_from_templateflow(space, res, home)
                        except BidsClError:
                            continue  # this resolution does not exist for this template
                found = find_template(space, resolution=res, home=home)
                if found is not None:
                    got.append(found)
            if not got:
                raise BidsClError(f"could not fetch {space} at resolution(s) {args.resolution}",
                                  EXIT_MISSING_INPUT)
            for tpl in got:
                print(f"{space} res-{tpl.resolution} ({tpl.source}): {tpl.t1w}, {tpl.mask}")
    except BidsClError as exc:
        print(f"{FETCH_COMMAND}: error: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # network errors from TemplateFlow come in many types
        print(f"{FETCH_COMMAND}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"done: export TEMPLATEFLOW_HOME={home}  (in containers: bind it and set "
          "SINGULARITYENV_TEMPLATEFLOW_HOME / APPTAINERENV_TEMPLATEFLOW_HOME)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

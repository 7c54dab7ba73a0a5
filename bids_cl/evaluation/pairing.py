"""Find predicted masks and their reference masks by BIDS prefix (no pybids: plain file names)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bids_cl.derivatives import spec

PREDICTION_SUFFIX = spec.suffix_of("lesion_mask")
REFERENCE_SUFFIX = spec.suffix_of("cl_mask", spec.REFERENCE)
_ENTITY = re.compile(r"(?:^|_)([a-zA-Z0-9]+)-([a-zA-Z0-9]+)")


@dataclass(frozen=True)
class Pair:
    """One predicted mask and the reference mask of the same prefix."""

    prefix: str  # e.g. "sub-01_ses-01_acq-mp2rage"
    prediction: Path
    reference: Path

    @property
    def entities(self) -> dict[str, str]:
        return prefix_entities(self.prefix)


@dataclass(frozen=True)
class MissingPair:
    """A prediction without reference, or a reference without prediction."""

    prefix: str
    missing: str  # "reference" | "prediction"
    present: Path  # the file that was found


def prefix_entities(prefix: str) -> dict[str, str]:
    """BIDS key-value entities of a prefix: {"sub": "01", "ses": "01", ...}."""
    return {key: value for key, value in _ENTITY.findall(prefix)}


def _masks_by_prefix(root: Path, suffix: str, skip: Path | None = None) -> dict[str, list[Path]]:
    """Native-space masks `<prefix><suffix>` under root (no `space-` entity), grouped by prefix."""
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob(f"*{suffix}")):
        if skip is not None and path.is_relative_to(skip):
            continue
        prefix = path.name[: -len(suffix)]
        if not prefix.startswith("sub-") or "space" in prefix_entities(prefix):
            continue
        found.setdefault(prefix, []).append(path)
    return found


def find_by_suffix(root: Path, suffix: str) -> dict[str, list[Path]]:
    """Native-space files ``<prefix><suffix>`` under root (e.g. truth dsegs and tables), by prefix."""
    return _masks_by_prefix(root, suffix)


def find_predictions(out_dir: Path, skip: Path | None = None) -> dict[str, list[Path]]:
    """Predicted native-space CL masks of a bids_cl output folder, by prefix (`skip` excluded)."""
    return _masks_by_prefix(out_dir, PREDICTION_SUFFIX, skip)


def find_references(ref_dir: Path, label: str) -> dict[str, list[Path]]:
    """Reference masks `<prefix>_label-<label>_mask.nii.gz` of a derivatives folder, by prefix."""
    return _masks_by_prefix(ref_dir, f"_label-{label}_mask.nii.gz")


def pair_masks(
    predictions: dict[str, list[Path]], references: dict[str, list[Path]]
) -> tuple[list[Pair], list[MissingPair], list[str]]:
    """Pair by prefix. Returns (pairs, missing pairs, warnings about duplicate prefixes).

    A prefix names one participant/session/image, so duplicates are unexpected; the first path in
    sorted order is used and a warning says so.
    """
    warnings = []
    for kind, table in (("prediction", predictions), ("reference", references)):
        for prefix, paths in table.items():
            if len(paths) > 1:
                warnings.append(
                    f"{len(paths)} {kind} masks share prefix {prefix}; using {paths[0]}"
                )
    pairs = [
        Pair(p, predictions[p][0], references[p][0])
        for p in sorted(predictions)
        if p in references
    ]
    missing = [
        MissingPair(p, "reference", predictions[p][0]) for p in sorted(predictions)
        if p not in references
    ] + [
        MissingPair(p, "prediction", references[p][0]) for p in sorted(references)
        if p not in predictions
    ]
    return pairs, missing, warnings


def find_participants_tsv(ref_dir: Path) -> Path | None:
    """participants.tsv of the reference dataset root, else of the raw dataset two levels up."""
    for candidate in (ref_dir / "participants.tsv", ref_dir.parent.parent / "participants.tsv"):
        if candidate.is_file():
            return candidate
    return None


def sibling(path: Path, prefix: str, suffix: str) -> Path:
    """The file `<prefix><suffix>` next to `path` (e.g. the truth dseg beside a reference mask)."""
    return path.parent / f"{prefix}{suffix}"

"""Lesion frequency maps in template space.

Voting unit: one vote per participant *per session*. The template-space lesion masks of all targets of
a participant-session (e.g. a UNIT1 and an MPRAGE of the same visit) are merged (union) into one vote,
then the map is the fraction of participant-sessions with a lesion at each voxel. Sessions, not
participants, are the unit because lesions appear and disappear between visits and a session's mask
is a complete observation; the cost is that participants with more sessions weigh more. Failed or
missing sessions have no mask and are not in the denominator. Masks on a grid other than the first
one's (another template resolution) are skipped and listed, never resampled silently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from bids_cl.derivatives.reader import TargetOutputs
from bids_cl.utils.io import atomic_save_nifti, atomic_write_json

LOGGER = logging.getLogger("bids_cl.group")


@dataclass
class FrequencyMap:
    space: str
    path: Path
    n_votes: int                     # participant-sessions
    n_participants: int
    max_frequency: float
    sources: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def frequency_map_name(space: str) -> str:
    return f"group_space-{space}_desc-frequency_probseg.nii.gz"


def compute_frequency_maps(targets: list[TargetOutputs], out_dir: Path) -> list[FrequencyMap]:
    """Write ``group_space-<tpl>_desc-frequency_probseg.nii.gz`` (+ JSON) for every space found."""
    out_dir = Path(out_dir)
    by_space: dict[str, dict[tuple[str, str | None], list[Path]]] = {}
    for target in targets:
        for space in target.spaces:
            key = (target.participant, target.session)
            by_space.setdefault(space, {}).setdefault(key, []).append(target.space_mask(space))
    maps = []
    for space in sorted(by_space):
        result = _one_space(space, by_space[space], out_dir)
        if result is not None:
            maps.append(result)
    return maps


def _one_space(space: str, votes: dict[tuple[str, str | None], list[Path]], out_dir: Path
               ) -> FrequencyMap | None:
    ref: nib.Nifti1Image | None = None
    count: np.ndarray | None = None
    n_votes = 0
    participants: set[str] = set()
    sources, skipped = [], []
    for (participant, _session), paths in sorted(votes.items(), key=lambda kv: str(kv[0])):
        union = None
        for path in paths:
            try:
                img = nib.load(str(path))
                data = np.asarray(img.dataobj)
            except Exception as exc:  # an unreadable mask costs its vote, not the map
                skipped.append(f"{path.relative_to(out_dir)} (unreadable: {exc})")
                continue
            data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
            if ref is None:
                ref = img
                count = np.zeros(img.shape[:3], np.uint32)
            elif data.shape != count.shape or not np.allclose(img.affine, ref.affine, atol=1e-3):
                skipped.append(f"{path.relative_to(out_dir)} (grid differs from the first mask)")
                continue
            union = data > 0 if union is None else union | (data > 0)
            sources.append(str(path.relative_to(out_dir)))
        if union is not None:
            count += union
            n_votes += 1
            participants.add(participant)
    if ref is None or n_votes == 0:
        return None
    frequency = (count / n_votes).astype(np.float32)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(frequency, ref.affine, header)
    img.header.set_xyzt_units("mm")
    path = out_dir / frequency_map_name(space)
    atomic_save_nifti(img, path)
    atomic_write_json(path.with_name(path.name.replace(".nii.gz", ".json")), {
        "Description": "Cortical lesion frequency: fraction of participant-sessions with a lesion "
                       "at each voxel (union of the session's targets; one vote per participant "
                       "per session).",
        "Space": space, "NumberOfVotes": n_votes, "NumberOfParticipants": len(participants),
        "VotingUnit": "participant-session", "Sources": sources, "Skipped": skipped,
    })
    if skipped:
        LOGGER.warning("frequency map %s: %d mask(s) skipped", space, len(skipped))
    return FrequencyMap(space, path, n_votes, len(participants), float(frequency.max()),
                        sources, skipped)

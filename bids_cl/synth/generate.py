"""Phantom generation: participants -> sessions -> images -> BIDS dataset with ground truth.

Randomness is split into independent streams keyed by (seed, participant, session, acquisition,
purpose), so a knob that changes one thing changes nothing else: with the same seed, the anatomy,
lesions and head poses are the same whatever the orientation, voxel size, dtype or file naming,
and only the grid (and the noise drawn on it) differs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bids_cl._version import __version__
from bids_cl.derivatives.spec import reference_name, sidecar_name
from bids_cl.synth import bids_io, contrast
from bids_cl.synth.anatomy import FRACTIONS, TemplateAnatomy, dominant_labels, load_template_anatomy
from bids_cl.synth.errors import EXIT_CANNOT_CREATE, EXIT_USAGE, SynthError
from bids_cl.synth.geometry import (
    ORIENTATIONS,
    Pullback,
    grid_affine,
    random_displacement,
    random_oblique_angles,
    random_pose,
    random_subject_affine,
    resample,
    voxel_centroid_world,
)
from bids_cl.synth.lesions import (
    CL_MIX,
    CL_TYPES,
    LESION_TYPES,
    SCALES,
    STATUS_DISAPPEARED,
    WML_MIX,
    WML_TYPES,
    ImageTruth,
    Lesion,
    PlannedLesion,
    image_truth,
    lesion_maps,
    place_lesions,
)

log = logging.getLogger("bids_cl.synth")

SIZES = ("tiny", "full")
FIELDS = ("3T", "7T", "mixed")
SEQUENCES = ("mp2rage", "mprage", "both", "mixed")
ORIENTATION_CHOICES = (*ORIENTATIONS, "mixed")

#: default voxel sizes (mm) per size and field; ``tiny`` is 2 mm whatever the field
VOXEL_SIZES = {("full", 3.0): (1.0, 1.0, 1.0), ("full", 7.0): (0.75, 0.75, 0.75),
               ("tiny", 3.0): (2.0, 2.0, 2.0), ("tiny", 7.0): (2.0, 2.0, 2.0)}

#: fictitious sites: (name, scanner model, field in T)
SITES = {3.0: (("lakeside", "MAGNETOM Prisma"), ("riverside", "MAGNETOM Skyra")),
         7.0: (("summit", "MAGNETOM Terra"),)}
DIAGNOSES = {"RRMS": 0.55, "SPMS": 0.2, "PPMS": 0.1, "CIS": 0.15}
#: mean numbers of cortical / white-matter lesions at baseline per diagnosis
LESION_MEANS = {"RRMS": (4.0, 8.0), "SPMS": (8.0, 12.0), "PPMS": (7.0, 8.0), "CIS": (1.5, 4.0)}
AGE_RANGE = {"RRMS": (20, 50), "SPMS": (40, 66), "PPMS": (38, 66), "CIS": (18, 45), "HC": (20, 60)}

# purposes of the random streams
_PLAN, _ANATOMY, _LESIONS, _POSE, _GRID, _FIELDS, _NOISE = range(1, 8)
_ACQ_CODES = {"mp2rage": 1, "mprage": 2}
_REGION_BITS = 3  # anatomy.VENTRICLE | CORTEX | HEAD


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, keys)]))


@dataclass(frozen=True)
class SynthOptions:
    """Everything that defines a phantom dataset (the CLI flags, one to one)."""

    participants: int = 2
    sessions: int = 1
    seed: int = 0
    field: str = "3T"
    sequence: str = "mp2rage"
    size: str = "tiny"
    orientation: str = "RAS"
    voxel_size: tuple[float, float, float] | None = None
    dtype: str = "uint16"
    uni_as_t1w: bool = False
    lesion_free_fraction: float = 0.2
    use_sessions: bool = True

    def __post_init__(self) -> None:
        def bad(msg: str) -> SynthError:
            return SynthError(msg, EXIT_USAGE)

        if self.participants < 1:
            raise bad("--participants must be at least 1")
        if self.sessions < 1:
            raise bad("--sessions must be at least 1")
        if not self.use_sessions and self.sessions != 1:
            raise bad("--no-sessions needs --sessions 1")
        for name, value, choices in (
            ("field", self.field, FIELDS), ("sequence", self.sequence, SEQUENCES),
            ("size", self.size, SIZES), ("orientation", self.orientation, ORIENTATION_CHOICES),
            ("dtype", self.dtype, bids_io.IMAGE_DTYPES),
        ):
            if value not in choices:
                raise bad(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.voxel_size is not None:
            vs = tuple(float(v) for v in self.voxel_size)
            if len(vs) != 3 or min(vs) <= 0 or max(vs) > 4:
                raise bad("--voxel-size needs three sizes in mm between 0 and 4, e.g. 1,1,1.2")
            object.__setattr__(self, "voxel_size", vs)
        if not 0.0 <= self.lesion_free_fraction <= 1.0:
            raise bad("--lesion-free-fraction must be between 0 and 1")

    def command_line(self) -> str:
        """The bids_cl-synth arguments that regenerate this dataset (recorded in the dataset)."""
        args = [f"--participants {self.participants}", f"--sessions {self.sessions}",
                f"--seed {self.seed}", f"--field {self.field}", f"--sequence {self.sequence}",
                f"--size {self.size}", f"--orientation {self.orientation}", f"--dtype {self.dtype}",
                f"--lesion-free-fraction {self.lesion_free_fraction:g}"]
        if self.voxel_size is not None:
            args.append("--voxel-size " + ",".join(f"{v:g}" for v in self.voxel_size))
        if self.uni_as_t1w:
            args.append("--uni-as-t1w")
        if not self.use_sessions:
            args.append("--no-sessions")
        return "bids_cl-synth OUT_DIR " + " ".join(args)


@dataclass(frozen=True)
class Participant:
    label: str
    index: int  # 0-based, keys the random streams
    field_t: float
    sequence: str  # mp2rage | mprage | both
    age: int
    sex: str
    site: str
    scanner: str
    diagnosis: str
    lesion_free: bool


def plan_participants(options: SynthOptions) -> list[Participant]:
    """Demographics, site, field and sequence of every participant."""
    rng = _rng(options.seed, 0, _PLAN)
    n = options.participants
    n_free = int(round(options.lesion_free_fraction * n))
    free = set(rng.permutation(n)[:n_free].tolist())
    width = max(2, len(str(n)))
    out = []
    for i in range(n):
        if options.field == "mixed":
            field_t = (3.0, 7.0)[i % 2]
        else:
            field_t = 3.0 if options.field == "3T" else 7.0
        if options.sequence == "mixed":
            sequence = ("mp2rage", "mprage", "both")[(i // 2) % 3]
        else:
            sequence = options.sequence
        lesion_free = i in free
        if lesion_free:
            diagnosis = "HC"
        else:
            names = list(DIAGNOSES)
            diagnosis = names[int(rng.choice(len(names), p=list(DIAGNOSES.values())))]
        lo, hi = AGE_RANGE[diagnosis]
        age = int(rng.integers(lo, hi))
        sex = "F" if rng.random() < (0.5 if lesion_free else 0.68) else "M"
        site, scanner = SITES[field_t][int(rng.integers(len(SITES[field_t])))]
        out.append(Participant(str(i + 1).zfill(width), i, field_t, sequence, age, sex, site,
                               scanner, diagnosis, lesion_free))
    return out


@dataclass
class ImagePhantom:
    """One segmentation target (UNI or MPRAGE T1w), its companion images and its truth."""

    session: int  # 1-based
    session_label: str | None
    sequence: str  # mp2rage | mprage
    orientation: str
    target: str  # file stem of the target image
    prefix: str  # target stem minus suffix: prefix of all truth files
    affine: np.ndarray
    images: dict[str, np.ndarray]  # file stem -> physical values (float32)
    sidecars: dict[str, dict]
    truth: ImageTruth
    brain_mask: np.ndarray
    labels: np.ndarray  # dominant tissue before lesions (anatomy.OTHER/CSF/GM/WM)
    regions: np.ndarray  # anatomy.VENTRICLE | CORTEX flags
    fractions: dict[str, np.ndarray] = field(repr=False)  # gm, wm, csf on this grid
    rows: list[dict] = field(default_factory=list)  # the lesion table

    @property
    def target_image(self) -> np.ndarray:
        return self.images[self.target]

    @property
    def present_rows(self) -> list[dict]:
        """Rows of the lesions in this image (the table also lists those that disappeared)."""
        return [r for r in self.rows if r["status"] != STATUS_DISAPPEARED]

    @property
    def cl_mask(self) -> np.ndarray:
        ids = [r["lesion_id"] for r in self.rows if r["label"] == "CL"]
        return np.isin(self.truth.dseg, ids)

    @property
    def wml_mask(self) -> np.ndarray:
        ids = [r["lesion_id"] for r in self.rows if r["label"] == "WML"]
        return np.isin(self.truth.dseg, ids)


@dataclass
class SubjectPhantom:
    participant: Participant
    lesions: list[Lesion]
    images: list[ImagePhantom]


# ----------------------------------------------------------------------------------------------
# lesion plan


def _count(rng: np.random.Generator, mean: float, cap: int) -> int:
    # negative binomial (overdispersed, many low counts, a few high): lesion counts in MS are
    return int(min(cap, rng.negative_binomial(2, 2.0 / (2.0 + mean)))) if mean > 0 else 0


def lesion_plan(
    rng: np.random.Generator, participant: Participant, sessions: int, size: str
) -> list[PlannedLesion]:
    """Type, onset session and course (enlarging, shrinking or disappearing session) of every
    lesion of a participant."""
    if participant.lesion_free:
        return []
    scale = SCALES[size]
    mean_cl, mean_wml = LESION_MEANS[participant.diagnosis]
    n_cl = _count(rng, mean_cl, scale.max_cl)
    n_wml = _count(rng, mean_wml, scale.max_wml)
    onsets = [1] * (n_cl + n_wml)
    labels = ["CL"] * n_cl + ["WML"] * n_wml
    for ses in range(2, sessions + 1):  # new activity between visits
        k_cl, k_wml = int(rng.poisson(1.0)), int(rng.poisson(0.8))
        onsets += [ses] * (k_cl + k_wml)
        labels += ["CL"] * k_cl + ["WML"] * k_wml
    plan = []
    for label, onset in zip(labels, onsets, strict=True):
        mix = CL_MIX if label == "CL" else WML_MIX
        kind = list(mix)[int(rng.choice(len(mix), p=list(mix.values())))]
        plan.append(PlannedLesion(kind, onset, *_course(rng, onset, sessions)))
    return plan


#: chance of each event in the course of a lesion that has later sessions (at most one event)
P_ENLARGE, P_SHRINK, P_DISAPPEAR = 0.3, 0.15, 0.1


def _course(
    rng: np.random.Generator, onset: int, sessions: int
) -> tuple[int | None, int | None, int | None]:
    """(enlarge, shrink, disappear) session of one lesion: one uniform draw picks the event, and
    the same draw, rescaled, the session of a shrink or a disappearance; only an enlargement draws
    its session apart, as the generator always did, so datasets keep their lesions and enlargements
    (a 1-session dataset draws nothing here)."""
    later = list(range(onset + 1, sessions + 1))
    if not later:
        return None, None, None
    u = float(rng.random())
    if u < P_ENLARGE:
        return int(rng.choice(later)), None, None

    def pick(fraction: float) -> int:  # fraction uniform in [0, 1) -> a later session, uniformly
        return later[min(len(later) - 1, int(fraction * len(later)))]

    u -= P_ENLARGE
    if u < P_SHRINK:
        return None, pick(u / P_SHRINK), None
    u -= P_SHRINK
    if u < P_DISAPPEAR:
        return None, None, pick(u / P_DISAPPEAR)
    return None, None, None


# ----------------------------------------------------------------------------------------------
# drawing one image


def _voxel_size(options: SynthOptions, field_t: float) -> tuple[float, float, float]:
    return options.voxel_size or VOXEL_SIZES[(options.size, field_t)]


def _orientation(options: SynthOptions, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    choice = str(rng.choice(ORIENTATIONS)) if options.orientation == "mixed" else options.orientation
    angles = random_oblique_angles(rng)  # always drawn, so the stream does not depend on the knob
    return choice, angles


def _table_rows(
    truth: ImageTruth, lesions: Sequence[Lesion], session: int, affine: np.ndarray
) -> list[dict]:
    by_id = {les.lesion_id: les for les in lesions}
    voxel_ul = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    # a lesion that vanished since the previous session: a row of volume 0, no centroid
    gone = [les.lesion_id for les in lesions if les.status_at(session) == STATUS_DISAPPEARED]
    for lesion_id in sorted([*truth.kept, *gone]):
        if lesion_id in gone:
            les = by_id[lesion_id]
            rows.append({"lesion_id": lesion_id, "type": les.type, "label": les.label,
                         "volume_ul": 0.0, "centroid_x": None, "centroid_y": None,
                         "centroid_z": None, "status": STATUS_DISAPPEARED})
            continue
        ijk = np.argwhere(truth.dseg == lesion_id).astype(float)
        centre = voxel_centroid_world(affine, ijk.mean(axis=0, keepdims=True))[0]
        les = by_id[lesion_id]
        rows.append({
            "lesion_id": lesion_id, "type": les.type, "label": les.label,
            "volume_ul": len(ijk) * voxel_ul,
            "centroid_x": centre[0], "centroid_y": centre[1], "centroid_z": centre[2],
            "status": les.status_at(session),
        })
    return rows


def draw_image(
    options: SynthOptions,
    participant: Participant,
    session: int,
    sequence: str,
    anat: TemplateAnatomy,
    subject_affine: np.ndarray,
    displacement,
    lesions: Sequence[Lesion],
    lesion_fields: tuple[np.ndarray, np.ndarray],
    names: dict[str, str],
) -> ImagePhantom:
    """Simulate one acquisition (MP2RAGE: INV1, INV2, UNI; MPRAGE: T1w) and its truth."""
    seed, idx, acq = options.seed, participant.index, _ACQ_CODES[sequence]
    field_t = participant.field_t
    # head pose: the session's positioning plus a little motion between the acquisitions
    pose = random_pose(_rng(seed, idx, session, 0, _POSE), 4.0, 5.0)
    pose = random_pose(_rng(seed, idx, session, acq, _POSE), 1.0, 1.0) @ pose
    orientation, angles = _orientation(options, _rng(seed, idx, session, acq, _GRID))
    vox2world, shape = grid_affine(orientation, _voxel_size(options, field_t), angles)
    pullback = Pullback(np.linalg.inv(pose), subject_affine, displacement, anat.affine)

    soft, key = lesion_fields
    lin, key_out, soft_out = resample(
        pullback, vox2world, shape, anat.fractions, key, soft, local_key=lambda k: k >> _REGION_BITS
    )
    ids_out = (key_out >> _REGION_BITS).astype(np.int16)
    regions_out = (key_out & ((1 << _REGION_BITS) - 1)).astype(np.uint8)
    del key_out
    ch = {name: lin[i] for i, name in enumerate(FRACTIONS)}
    labels = dominant_labels(ch["gm"], ch["wm"], ch["csf"])
    min_vox = SCALES[options.size].min_voxels
    truth = image_truth(soft_out, ids_out, labels, regions_out, lesions, min_vox)

    mix = contrast.lesion_mixture(ch["gm"], ch["wm"], ch["csf"], ch["fat"], ch["bone"], truth.fraction)
    frng = _rng(seed, idx, session, acq, _FIELDS)
    b1_tx = contrast.transmit_field(frng, vox2world, shape, field_t)
    b1_rx = contrast.receive_field(frng, vox2world, shape, field_t)
    signals = contrast.synthesize(mix, b1_tx, contrast.signal_tables(field_t, sequence))
    del mix, b1_tx
    signals *= b1_rx
    del b1_rx
    ref = contrast.reference_wm_signal(field_t, sequence)
    sigma = ref / contrast.SNR[field_t]
    nrng = _rng(seed, idx, session, acq, _NOISE)
    images: dict[str, np.ndarray] = {}
    if sequence == "mp2rage":
        re1, im1 = contrast.add_noise(nrng, signals[0], sigma)
        re2, im2 = contrast.add_noise(nrng, signals[1], sigma)
        del signals
        uni = contrast.uni_from_parts(re1, im1, re2, im2)
        gain = contrast.WM_LEVEL["inv"] / ref
        images[names["uni"]] = (uni + np.float32(0.5)) * np.float32(contrast.UNI_RANGE)
        images[names["inv1"]] = _magnitude(re1, im1, gain)
        images[names["inv2"]] = _magnitude(re2, im2, gain)
        target = names["uni"]
    else:
        re, im = contrast.add_noise(nrng, signals[0], sigma)
        images[names["t1w"]] = _magnitude(re, im, contrast.WM_LEVEL["t1w"] / ref)
        target = names["t1w"]
    sidecars = {
        stem: _sidecar(participant, sequence, stem, names, vox2world, options)
        for stem in images
    }
    return ImagePhantom(
        session=session,
        session_label=_session_label(options, session),
        sequence=sequence,
        orientation=orientation,
        target=target,
        prefix=names["prefix"],
        affine=vox2world,
        images=images,
        sidecars=sidecars,
        truth=truth,
        brain_mask=ch["brain"] > 0.5,
        labels=labels,
        regions=regions_out,
        fractions={k: ch[k] for k in ("gm", "wm", "csf")},
        rows=_table_rows(truth, lesions, session, vox2world),
    )


def _magnitude(real: np.ndarray, imag: np.ndarray, gain: float) -> np.ndarray:
    """Scaled magnitude image, clipped to the 12-bit range of the scanner's DICOMs."""
    out = np.hypot(real, imag)
    out *= np.float32(gain)
    return np.minimum(out, np.float32(4095.0), out=out)


def _session_label(options: SynthOptions, session: int) -> str | None:
    return str(session).zfill(2) if options.use_sessions else None


def _sidecar(
    participant: Participant, sequence: str, stem: str, names: dict[str, str],
    vox2world: np.ndarray, options: SynthOptions,
) -> dict:
    """JSON sidecar as dcm2niix would write it for a Siemens scanner (plus BIDS qMRI fields)."""
    field_t = participant.field_t
    vs = np.sqrt((vox2world[:3, :3] ** 2).sum(axis=0))
    common = {
        "Manufacturer": "Siemens",
        "ManufacturersModelName": participant.scanner,
        "MagneticFieldStrength": int(field_t),
        "InstitutionName": f"{participant.site} (synthetic)",
        "ReceiveCoilName": "1Tx32Rx_Head" if field_t >= 7 else "HeadNeck_64",
        "StationName": f"{participant.site.upper()}MR",
        "SoftwareVersions": "syngo MR XA30" if field_t < 7 else "syngo MR E12",
        "MRAcquisitionType": "3D",
        "ScanningSequence": "GR\\IR",
        "SequenceVariant": "SK\\SP\\MP",
        "SequenceName": "tfl3d1_16ns",
        "MatrixCoilMode": "GRAPPA",
        "CoilCombinationMethod": "Adaptive Combine",
        "NonlinearGradientCorrection": False,
        "SliceThickness": round(float(vs[2]), 4),
        "ConversionSoftware": "bids_cl-synth",
        "ConversionSoftwareVersion": __version__,
    }
    if sequence == "mprage":
        p = contrast.MPRAGE[field_t]
        return {
            **common,
            "PulseSequenceType": "MPRAGE",
            "SeriesDescription": "t1_mprage_sag_p2_iso",
            "ProtocolName": "t1_mprage_sag_p2_iso",
            "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND", "NORM"],
            "EchoTime": p.echo_time_ms / 1000,
            "RepetitionTime": p.tr_ms / 1000,
            "InversionTime": p.ti_ms / 1000,
            "FlipAngle": p.flip_deg,
            "RepetitionTimeExcitation": p.esp_ms / 1000,
        }
    p = contrast.MP2RAGE[field_t]
    mp2 = {
        **common,
        "PulseSequenceType": "MP2RAGE",
        "ProtocolName": "mp2rage_sag_p3",
        "EchoTime": p.echo_time_ms / 1000,
        "RepetitionTimePreparation": p.tr_ms / 1000,
        "RepetitionTimeExcitation": p.esp_ms / 1000,
        "NumberShots": p.n_shots,
    }
    if stem == names["inv1"]:
        return {**mp2, "SeriesDescription": "mp2rage_sag_p3_INV1",
                "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                "InversionTime": p.ti1_ms / 1000, "FlipAngle": p.flip1_deg}
    if stem == names["inv2"]:
        return {**mp2, "SeriesDescription": "mp2rage_sag_p3_INV2",
                "ImageType": ["ORIGINAL", "PRIMARY", "M", "ND"],
                "InversionTime": p.ti2_ms / 1000, "FlipAngle": p.flip2_deg}
    # the UNI image: BIDS types InversionTime as one number, so both inversion times and flip
    # angles go in the (array-typed) FlipAngle and a bids_cl-specific InversionTimes list
    return {**mp2, "SeriesDescription": "mp2rage_sag_p3_UNI_Images",
            "ImageType": ["DERIVED", "PRIMARY", "M", "ND", "UNI"],
            "FlipAngle": [p.flip1_deg, p.flip2_deg],
            "InversionTimes": [p.ti1_ms / 1000, p.ti2_ms / 1000]}


# ----------------------------------------------------------------------------------------------
# subject and dataset


def simulate_subject(options: SynthOptions, participant: Participant) -> SubjectPhantom:
    """All images of one participant, in memory (no file is written)."""
    scale = SCALES[options.size]
    anat = load_template_anatomy(scale.template_resolution)
    arng = _rng(options.seed, participant.index, _ANATOMY)
    subject_affine = random_subject_affine(arng)
    displacement = random_displacement(arng)
    lrng = _rng(options.seed, participant.index, _LESIONS)
    plan = lesion_plan(lrng, participant, options.sessions, options.size)
    lesions = place_lesions(lrng, anat, scale, plan)
    images = []
    for session in range(1, options.sessions + 1):
        soft, ids = lesion_maps(anat, lesions, session, scale.edge_mm)
        # one nearest-neighbour map carries both the lesion ids and the region flags
        fields = (soft, (ids.astype(np.int32) << _REGION_BITS) | anat.regions)
        ses_label = _session_label(options, session)
        both = participant.sequence == "both"
        sequences = ("mp2rage", "mprage") if both else (participant.sequence,)
        for sequence in sequences:
            if sequence == "mp2rage":
                names = bids_io.mp2rage_names(participant.label, ses_label, both=both,
                                              uni_as_t1w=options.uni_as_t1w)
            else:
                names = bids_io.mprage_names(participant.label, ses_label, both=both)
            images.append(draw_image(options, participant, session, sequence, anat,
                                     subject_affine, displacement, lesions, fields, names))
    return SubjectPhantom(participant, lesions, images)


STATS_COLUMNS = ("lesion_id", "type", "label", "volume_ul", "centroid_x", "centroid_y",
                 "centroid_z", "status")


def write_subject(root: Path, subject: SubjectPhantom, options: SynthOptions) -> None:
    """Raw images + sidecars under ``root``, truth under ``root/derivatives/manual_masks``."""
    label = subject.participant.label
    truth_root = root / "derivatives" / "manual_masks"
    for img in subject.images:
        raw_dir = bids_io.anat_dir(root, label, img.session_label)
        for stem, data in img.images.items():
            bids_io.write_image(raw_dir / f"{stem}.nii.gz", data, img.affine, options.dtype)
            bids_io.write_json(raw_dir / f"{stem}.json", img.sidecars[stem])
        out = bids_io.anat_dir(truth_root, label, img.session_label)
        rel = raw_dir.relative_to(root) / f"{img.target}.nii.gz"
        source = [f"bids:raw:{rel.as_posix()}"]
        p = img.prefix
        bids_io.write_label(out / reference_name(p, "cl_mask"), img.cl_mask, img.affine)
        bids_io.write_label(out / reference_name(p, "wml_mask"), img.wml_mask, img.affine)
        bids_io.write_label(out / reference_name(p, "brain_mask"), img.brain_mask, img.affine)
        bids_io.write_label(out / reference_name(p, "lesions_dseg"), img.truth.dseg, img.affine)
        bids_io.write_json(out / sidecar_name(reference_name(p, "cl_mask")), {
            "Type": "Lesion", "Sources": source,
            "Description": "Cortical lesions (leukocortical, intracortical, juxtacortical)"})
        bids_io.write_json(out / sidecar_name(reference_name(p, "wml_mask")), {
            "Type": "Lesion", "Sources": source,
            "Description": "White-matter lesions (periventricular, deep); distractors, not CL"})
        bids_io.write_json(out / sidecar_name(reference_name(p, "brain_mask")),
                           {"Type": "Brain", "Sources": source})
        bids_io.write_json(out / sidecar_name(reference_name(p, "lesions_dseg")), {
            "Sources": source, "Description": "Voxel value = lesion_id of the stats table"})
        bids_io.write_tsv(out / reference_name(p, "lesions_table"), STATS_COLUMNS, img.rows)


def _dataset_files(root: Path, options: SynthOptions, participants: Sequence[Participant]) -> None:
    generated_by = [{"Name": "bids_cl-synth", "Version": __version__,
                     "Description": options.command_line()}]
    bids_io.write_json(root / "dataset_description.json", {
        "Name": "bids_cl synthetic multiple sclerosis phantoms",
        "BIDSVersion": "1.10.0",
        "DatasetType": "raw",
        "License": "CC0",
        "Authors": ["bids_cl developers", "bids_cl-synth (generator)"],
        "GeneratedBy": generated_by,
    })
    (root / "README").write_text(_README.format(command=options.command_line(), version=__version__))
    bids_io.write_tsv(root / "participants.tsv", ("participant_id", "age", "sex", "site", "diagnosis"), [
        {"participant_id": f"sub-{p.label}", "age": p.age, "sex": p.sex, "site": p.site,
         "diagnosis": p.diagnosis} for p in participants
    ])
    bids_io.write_json(root / "participants.json", {
        "age": {"Description": "age at the first session", "Units": "year"},
        "sex": {"Description": "sex of the participant", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "scanning site (fictitious; 7 T sites run MAGNETOM Terra)"},
        "diagnosis": {"Description": "clinical diagnosis", "Levels": {
            "RRMS": "relapsing-remitting multiple sclerosis",
            "SPMS": "secondary progressive multiple sclerosis",
            "PPMS": "primary progressive multiple sclerosis",
            "CIS": "clinically isolated syndrome",
            "HC": "healthy control (lesion-free phantom)"}},
    })
    truth = root / "derivatives" / "manual_masks"
    bids_io.write_json(truth / "dataset_description.json", {
        "Name": "Ground truth of the bids_cl phantoms",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": generated_by,
        "SourceDatasets": [{"URL": "bids:raw:"}],
        "DatasetLinks": {"raw": "../../"},
    })
    bids_io.write_json(truth / "desc-lesions_stats.json", _STATS_DICTIONARY)


_STATS_DICTIONARY = {
    "lesion_id": {"Description": "value of the lesion in the desc-lesions_dseg image; the same "
                                 "lesion keeps its id across sessions"},
    "type": {"Description": "lesion type", "Levels": {
        "leukocortical": "crosses the cortical grey/white-matter boundary",
        "intracortical": "inside the cortical grey matter",
        "juxtacortical": "white matter touching the cortex",
        "periventricular": "white matter touching the lateral ventricles",
        "deep_wm": "deep white matter"}},
    "label": {"Description": "truth class", "Levels": {"CL": "cortical lesion",
                                                       "WML": "white-matter lesion (not CL)"}},
    "volume_ul": {"Description": "voxel count x voxel volume", "Units": "uL"},
    "centroid_x": {"Description": "centroid, scanner coordinates", "Units": "mm"},
    "centroid_y": {"Description": "centroid, scanner coordinates", "Units": "mm"},
    "centroid_z": {"Description": "centroid, scanner coordinates", "Units": "mm"},
    "status": {"Description": "course since the previous session", "Levels": {
        "baseline": "present at the first session",
        "new": "absent at the previous session",
        "enlarging": "larger than at the previous session",
        "stable": "unchanged since the previous session",
        "shrinking": "smaller than at the previous session",
        "disappeared": "present at the previous session, gone at this one (volume 0, no "
                       "centroid; the row keeps the lesion's id)"}},
}

_README = """\
bids_cl synthetic multiple sclerosis phantoms
=============================================

Synthetic MRI generated by bids_cl-synth {version}; no real participant is in this dataset.

Anatomy: MNI152 2009a grey/white-matter maps (nilearn) and the Colin27 head (Debian mricron-data),
warped per participant (random affine + smooth non-linear displacement). Contrast: MP2RAGE/MPRAGE
signal equations with B1 inhomogeneity and Rician noise. Lesions: cortical (leukocortical,
intracortical, juxtacortical; label CL) and white-matter distractors (label WML).

Ground truth: derivatives/manual_masks, one set of masks and a lesion table per image, with the
prefix of the image it annotates and on its voxel grid.

Regenerate with:

    {command}
"""


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"{out} exists and is not a directory", EXIT_CANNOT_CREATE)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SynthError(f"{out} is not empty (use --overwrite to write into it)", EXIT_CANNOT_CREATE)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SynthError(f"cannot create {out}: {err.strerror}", EXIT_CANNOT_CREATE) from err


def generate_dataset(
    out_dir: str | Path,
    *,
    participants: int = 2,
    sessions: int = 1,
    seed: int = 0,
    field: str = "3T",
    sequence: str = "mp2rage",
    size: str = "tiny",
    orientation: str = "RAS",
    voxel_size: Sequence[float] | None = None,
    dtype: str = "uint16",
    uni_as_t1w: bool = False,
    lesion_free_fraction: float = 0.2,
    use_sessions: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a complete phantom BIDS dataset (raw + derivatives/manual_masks); returns its path."""
    options = SynthOptions(
        participants=participants, sessions=sessions, seed=seed, field=field, sequence=sequence,
        size=size, orientation=orientation,
        voxel_size=tuple(voxel_size) if voxel_size is not None else None,  # type: ignore[arg-type]
        dtype=dtype, uni_as_t1w=uni_as_t1w, lesion_free_fraction=lesion_free_fraction,
        use_sessions=use_sessions,
    )
    return write_dataset(out_dir, options, overwrite=overwrite)


def write_dataset(
    out_dir: str | Path,
    options: SynthOptions,
    *,
    overwrite: bool = False,
    on_subject: Callable[[SubjectPhantom], None] | None = None,
) -> Path:
    """``generate_dataset`` with the options already gathered.

    ``on_subject`` sees every simulated participant (arrays, tissue labels, truth) after it is
    written, e.g. for tests that check the files against the in-memory phantom.
    """
    root = Path(out_dir).absolute()
    _check_out_dir(root, overwrite)
    people = plan_participants(options)
    _dataset_files(root, options, people)
    for person in people:
        t0 = time.perf_counter()
        subject = simulate_subject(options, person)
        write_subject(root, subject, options)
        if on_subject is not None:
            on_subject(subject)
        n_cl = sum(les.label == "CL" for les in subject.lesions)
        log.info("sub-%s: %s %s, %d CL + %d WML lesions, %.1f s", person.label,
                 f"{person.field_t:g}T", person.sequence, n_cl, len(subject.lesions) - n_cl,
                 time.perf_counter() - t0)
    return root


__all__ = [
    "CL_TYPES", "WML_TYPES", "LESION_TYPES", "SynthOptions", "Participant", "ImagePhantom",
    "SubjectPhantom", "plan_participants", "simulate_subject", "write_subject", "draw_image",
    "generate_dataset", "write_dataset", "lesion_plan", "PlannedLesion",
]

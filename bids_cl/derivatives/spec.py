"""The vocabulary of bids_cl's derivatives: every file name, entity, column and dictionary, in one place.

The writer (:mod:`bids_cl.derivatives.writer`) names files only through :func:`output_name`, and every
reader (reports, group level, ``bids_cl-evaluate``, ``bids_cl-demo``) finds them only through the same
names, so writer and readers cannot drift apart (sMRIPrep's declarative output spec, in Python).

This module is pure data and imports nothing from bids_cl, so that every layer, the engine included
(its lesion table has :data:`LESION_COLUMNS`), can use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PIPELINE_NAME = "bids_cl"
CODE_URL = "https://github.com/bids-cl/bids_cl"
BIDS_VERSION = "1.10.0"

# BIDS entity order inside a derivative name, after the source image's own entities (the prefix).
ENTITY_ORDER = ("from", "to", "mode", "space", "label", "desc")


@dataclass(frozen=True)
class Output:
    """One kind of derivative of a segmentation target: its entities, suffix and extension.

    ``space``/``to`` given as ``"{space}"`` take the template space the file is in.
    """

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str
    description: str

    def name(self, prefix: str, *, space: str | None = None) -> str:
        """``<prefix>_<entities>_<suffix><extension>`` for this target (and template space)."""
        parts = [prefix]
        for key, value in self.entities:
            if value == "{space}":
                if not space:
                    raise ValueError(f"a {self.suffix} in template space needs the space's name")
                value = space
            parts.append(f"{key}-{value}")
        return "_".join([*parts, self.suffix]) + self.extension

    @property
    def in_template_space(self) -> bool:
        return any(value == "{space}" for _, value in self.entities)

    def space_of(self, filename: str, prefix: str) -> str | None:
        """The template space named in ``filename`` when it is this kind of output of ``prefix``."""
        if not self.in_template_space:
            return None
        head, tail = self.name(prefix, space="\0").split("\0")
        if filename.startswith(head) and filename.endswith(tail) and len(filename) > len(head) + len(tail):
            space = filename[len(head):-len(tail)]
            return space if space.isalnum() else None
        return None


def _o(entities: dict[str, str], suffix: str, extension: str, description: str) -> Output:
    ordered = tuple(sorted(entities.items(), key=lambda kv: ENTITY_ORDER.index(kv[0])))
    return Output(ordered, suffix, extension, description)


# Every derivative of one target, in the order the writer writes them (the summary last: a target is
# complete once its summary exists). Keys are what code says; names are what users see.
OUTPUTS: dict[str, Output] = {
    "brain_mask": _o({"desc": "brain"}, "mask", ".nii.gz",
                     "Brain mask from skull stripping of the segmented T1-weighted image"),
    "preproc": _o({"desc": "preproc"}, "T1w", ".nii.gz",
                  "Skull-stripped T1-weighted image (MP2RAGE UNI or MPRAGE) fed to the lesion model"),
    "probseg": _o({"label": "CL"}, "probseg", ".nii.gz",
                  "Ensemble (mean over folds) probability of cortical lesion"),
    "lesion_mask": _o({"label": "CL"}, "mask", ".nii.gz",
                      "Cortical lesions (leukocortical, intracortical, juxtacortical), binary"),
    "space_mask": _o({"space": "{space}", "label": "CL"}, "mask", ".nii.gz",
                     "Cortical lesion mask resampled to a template (nearest neighbour)"),
    "space_probseg": _o({"space": "{space}", "label": "CL"}, "probseg", ".nii.gz",
                        "Lesion probability resampled to a template (linear)"),
    "space_preproc": _o({"space": "{space}", "desc": "preproc"}, "T1w", ".nii.gz",
                        "Skull-stripped T1-weighted image registered to a template (linear)"),
    "xfm": _o({"from": "T1w", "to": "{space}", "mode": "image"}, "xfm", ".h5",
              "Composite ITK transform from the image to a template"),
    "lesions": _o({"label": "CL", "desc": "lesions"}, "stats", ".tsv",
                  "Per-lesion measurements of the cortical lesion mask (one row per lesion)"),
    "summary": _o({"label": "CL", "desc": "summary"}, "stats", ".json",
                  "Per-image summary of the cortical lesion segmentation (lesion count, volumes)"),
    # Lesion-level change between an earlier session E and this (later) session L of one target line
    # (bids_cl.longitudinal): in L's anat folder, named with L's prefix; "{earlier}" is E's session
    # label. Named with change_name(); the summary is written last (a complete pair has its summary).
    "change_table": _o({"label": "CL", "desc": "changeFrom{earlier}"}, "stats", ".tsv",
                       "Per-lesion change since an earlier session (one row per lesion relation)"),
    "change_dseg": _o({"desc": "changeFrom{earlier}"}, "dseg", ".nii.gz",
                      "Change class of every lesion on this session's grid (1 new, 2 enlarging, "
                      "3 stable, 4 shrinking, 5 disappeared)"),
    "change_summary": _o({"label": "CL", "desc": "changeSummaryFrom{earlier}"}, "stats", ".json",
                         "Counts of new, enlarging, stable, shrinking and disappeared lesions since an "
                         "earlier session, net volume change, alignment quality and the rules used"),
}

# desc- values and what they mean (descriptions.tsv at the derivatives root).
DESCRIPTIONS = {
    "brain": OUTPUTS["brain_mask"].description,
    "preproc": OUTPUTS["preproc"].description,
    "lesions": OUTPUTS["lesions"].description,
    "summary": OUTPUTS["summary"].description,
}


def output_name(prefix: str, key: str, *, space: str | None = None) -> str:
    """The file name of derivative ``key`` (a key of :data:`OUTPUTS`) of the target ``prefix``."""
    return OUTPUTS[key].name(prefix, space=space)


CHANGE_KEYS = ("change_table", "change_dseg", "change_summary")
_EARLIER = "{earlier}"


def change_name(prefix: str, key: str, *, earlier: str) -> str:
    """The file name of change output ``key`` (:data:`CHANGE_KEYS`) of the later session's target
    ``prefix``, relative to the earlier session labelled ``earlier`` (``01`` -> ``desc-changeFrom01``)."""
    if key not in CHANGE_KEYS:
        raise ValueError(f"{key} is not a change output ({', '.join(CHANGE_KEYS)})")
    if not earlier or not earlier.isalnum():
        raise ValueError(f"a session label is alphanumeric, not {earlier!r}")
    return OUTPUTS[key].name(prefix).replace(_EARLIER, earlier)


def _change_pattern(key: str) -> tuple[str, str]:
    """What comes before and after E's label in change output ``key``'s name (prefix excluded)."""
    if key not in CHANGE_KEYS:
        raise ValueError(f"{key} is not a change output ({', '.join(CHANGE_KEYS)})")
    head, tail = OUTPUTS[key].name("").split(_EARLIER)
    return head, tail


def change_glob(key: str) -> str:
    """Glob (below an ``anat`` folder) matching change output ``key`` of every pair."""
    head, tail = _change_pattern(key)
    return f"*{head}*{tail}"


def parse_change_name(filename: str, key: str) -> tuple[str, str] | None:
    """``(later prefix, earlier session label)`` of a change output file name of kind ``key``, else None."""
    head, tail = _change_pattern(key)
    if not filename.endswith(tail) or head not in filename:
        return None
    stem = filename[: -len(tail)]
    prefix, _, earlier = stem.rpartition(head)
    return (prefix, earlier) if prefix and earlier.isalnum() else None


def anat_dir(participant: str, session: str | None) -> str:
    """Relative folder of a target's derivatives: ``sub-X[/ses-Y]/anat``."""
    return "/".join([f"sub-{participant}", *([f"ses-{session}"] if session else []), "anat"])


def sidecar_name(filename: str) -> str:
    """The JSON sidecar of a NIfTI, table or transform (``x.nii.gz`` -> ``x.json``)."""
    for ext in (".nii.gz", ".nii", ".tsv", ".h5"):
        if filename.endswith(ext):
            return filename[: -len(ext)] + ".json"
    raise ValueError(f"{filename} has no sidecar")


def summary_glob() -> str:
    """Glob (below an ``anat`` folder) matching every target's summary."""
    return "*" + suffix_of("summary")


def line_of(prefix: str) -> str:
    """A target's prefix without its ``ses-`` entity: the same acquisition followed over sessions."""
    return re.sub(r"_ses-[A-Za-z0-9]+", "", str(prefix))


def prefix_of_summary(filename: str) -> str | None:
    """The target prefix of a summary file name, or None when it is not a summary."""
    tail = suffix_of("summary")
    return filename[: -len(tail)] if filename.endswith(tail) and len(filename) > len(tail) else None


# ------------------------------------------------------------------------------------------------
# Tables

LESION_COLUMNS = [
    "lesion_id", "voxels", "volume_ul",
    "centroid_i", "centroid_j", "centroid_k", "centroid_x", "centroid_y", "centroid_z",
    "bbox_i0", "bbox_j0", "bbox_k0", "bbox_i1", "bbox_j1", "bbox_k1",
    "mean_prob", "max_prob", "uncertainty",
]
TEMPLATE_COLUMNS = ["template_x", "template_y", "template_z"]

LESION_TABLE_DICTIONARY: dict[str, dict[str, str]] = {
    "lesion_id": {"Description": "Lesion number: the value of the lesion in the connected-component "
                  "labelling of the label-CL mask (1..N)"},
    "voxels": {"Description": "Number of voxels in the lesion"},
    "volume_ul": {"Description": "Lesion volume", "Units": "uL"},
    "centroid_i": {"Description": "Lesion centroid, first voxel index", "Units": "voxel"},
    "centroid_j": {"Description": "Lesion centroid, second voxel index", "Units": "voxel"},
    "centroid_k": {"Description": "Lesion centroid, third voxel index", "Units": "voxel"},
    "centroid_x": {"Description": "Lesion centroid in scanner (RAS+) coordinates, x", "Units": "mm"},
    "centroid_y": {"Description": "Lesion centroid in scanner (RAS+) coordinates, y", "Units": "mm"},
    "centroid_z": {"Description": "Lesion centroid in scanner (RAS+) coordinates, z", "Units": "mm"},
    "bbox_i0": {"Description": "Bounding box start, first voxel index (inclusive)"},
    "bbox_j0": {"Description": "Bounding box start, second voxel index (inclusive)"},
    "bbox_k0": {"Description": "Bounding box start, third voxel index (inclusive)"},
    "bbox_i1": {"Description": "Bounding box end, first voxel index (exclusive)"},
    "bbox_j1": {"Description": "Bounding box end, second voxel index (exclusive)"},
    "bbox_k1": {"Description": "Bounding box end, third voxel index (exclusive)"},
    "mean_prob": {"Description": "Mean ensemble lesion probability inside the lesion"},
    "max_prob": {"Description": "Maximum ensemble lesion probability inside the lesion"},
    "uncertainty": {"Description": "Lesion-scale uncertainty from fold disagreement: 1 - mean over "
                    "folds of the best IoU between this lesion and that fold's lesions (0 = all "
                    "folds agree; 0 when the model has one fold)"},
    "template_x": {"Description": "Lesion centroid in the template space of the run, x", "Units": "mm"},
    "template_y": {"Description": "Lesion centroid in the template space of the run, y", "Units": "mm"},
    "template_z": {"Description": "Lesion centroid in the template space of the run, z", "Units": "mm"},
}

# Lesion-level change between two sessions (bids_cl.longitudinal; docs/longitudinal.md).
CHANGE_CODES = {"new": 1, "enlarging": 2, "stable": 3, "shrinking": 4, "disappeared": 5}
CHANGE_COLUMNS = [
    "lesion_id_before", "lesion_id_after", "change", "merge_split",
    "volume_before_ul", "volume_after_ul", "change_ul", "change_pct",
    "centroid_x", "centroid_y", "centroid_z", "template_x", "template_y", "template_z",
    "mean_prob_before", "mean_prob_after", "prior_max_prob", "probability_rescued",
]
CHANGE_TABLE_DICTIONARY: dict[str, dict[str, Any]] = {
    "lesion_id_before": {"Description": "lesion_id in the earlier session's lesion table (n/a: no "
                         "earlier lesion, i.e. new or rescued by the probability rule)"},
    "lesion_id_after": {"Description": "lesion_id in this (later) session's lesion table (n/a: "
                        "disappeared)"},
    "change": {"Description": "Change class of the lesion (of its merge/split group)",
               "Levels": {"new": "no earlier lesion within the tolerance, no earlier probability "
                          "above the rescue threshold", "enlarging": "grew by at least the relative "
                          "and the absolute threshold", "stable": "neither enlarging nor shrinking",
                          "shrinking": "shrank by at least the relative and the absolute threshold",
                          "disappeared": "no later lesion within the tolerance"}},
    "merge_split": {"Description": "Several earlier lesions joined into one later lesion (merge: "
                    "one row per earlier lesion) or one earlier lesion broke into several (split: one "
                    "row per later lesion)", "Levels": {"none": "one-to-one or unmatched",
                                                         "merge": "merge", "split": "split"}},
    "volume_before_ul": {"Description": "Volume of the earlier lesion (its lesion table); for a "
                         "rescued lesion the earlier extent above the rescue probability; 0 when new",
                         "Units": "uL"},
    "volume_after_ul": {"Description": "Volume of the later lesion (its lesion table); 0 when "
                        "disappeared", "Units": "uL"},
    "change_ul": {"Description": "Volume change, later minus earlier (of the whole group for merge and "
                  "split rows)", "Units": "uL"},
    "change_pct": {"Description": "Volume change relative to the earlier volume (of the whole group for "
                   "merge and split rows); n/a when new", "Units": "%"},
    "centroid_x": {"Description": "Lesion centroid in this session's scanner (RAS+) space, x (a "
                   "disappeared lesion: the earlier centroid mapped into this session)", "Units": "mm"},
    "centroid_y": {"Description": "As centroid_x, y", "Units": "mm"},
    "centroid_z": {"Description": "As centroid_x, z", "Units": "mm"},
    "template_x": {"Description": "Lesion centroid in the run's template space, x (from the lesion "
                   "tables; n/a without template space)", "Units": "mm"},
    "template_y": {"Description": "As template_x, y", "Units": "mm"},
    "template_z": {"Description": "As template_x, z", "Units": "mm"},
    "mean_prob_before": {"Description": "Mean lesion probability of the earlier lesion (its table)"},
    "mean_prob_after": {"Description": "Mean lesion probability of the later lesion (its table)"},
    "prior_max_prob": {"Description": "Maximum earlier-session probability inside the later lesion's "
                       "footprint after alignment (n/a when disappeared)"},
    "probability_rescued": {"Description": "true when the earlier probability map stopped this lesion "
                            "from being called new (a faint earlier lesion below the threshold)"},
}
CHANGE_SUMMARY_FIELDS: dict[str, str] = {
    "New": "later lesions without an earlier one",
    "Enlarging": "later lesions (or merge/split groups' later lesions) that grew",
    "Stable": "later lesions neither enlarging nor shrinking",
    "Shrinking": "later lesions that shrank",
    "Disappeared": "earlier lesions without a later one",
    "Merges": "groups of several earlier lesions joined into one later lesion",
    "Splits": "groups of one earlier lesion broken into several later lesions",
    "ProbabilityRescued": "later lesions the probability rule kept from being new",
    "LesionCountBefore": "lesions in the earlier session's table",
    "LesionCountAfter": "lesions in the later session's table",
    "TotalVolumeBefore_uL": "total lesion volume of the earlier session (uL)",
    "TotalVolumeAfter_uL": "total lesion volume of the later session (uL)",
    "NetVolumeChange_uL": "TotalVolumeAfter_uL - TotalVolumeBefore_uL",
    "AlignmentQuality": "correlation of the two skull-stripped images inside both brains, halfway space",
    "AlignmentQualityUnaligned": "the same correlation before alignment (identity), for comparison",
    "AlignmentAccepted": "AlignmentQuality >= Rules.min_alignment",
    "Alignment": "method, seed and the earlier -> later rigid transform (RAS mm, 4x4)",
    "Rules": "the thresholds used (docs/longitudinal.md)",
    "Earlier": "prefix of the earlier session's target",
    "Later": "prefix of the later session's target",
    "Refused": "null, or why no change was classified (then no table and no map exist)",
    "GeneratedBy": "bids_cl name and version",
}

# The per-image summary JSON: every key the writer writes, in its order, and what it holds.
SUMMARY_FIELDS: dict[str, str] = {
    "LesionCount": "number of cortical lesions (rows of the lesion table)",
    "TotalVolume_uL": "sum of the lesion volumes (uL)",
    "MedianVolume_uL": "median lesion volume (uL; 0 without lesions)",
    "Sequence": "MP2RAGE or MPRAGE, as discovery decided",
    "FieldStrength": "MagneticFieldStrength of the image's sidecar (T), or null",
    "SkullStripStrategy": "synthstrip, deepbet, inv2, ants or none",
    "Model": "provenance of the model (name, source, DOI, folds, checkpoint hashes, warning)",
    "OODWarning": "why the intensities look unlike the training data, or null",
    "Threshold": "ensemble probability threshold used",
    "ThresholdSource": "user, model (tuned on its validation split) or default",
    "Connectivity": "voxel neighbourhood joining lesion voxels (6, 18, 26)",
    "MinLesionSize": "minimum lesion size as given (voxels, or a volume such as '3uL'), or null",
    "MinLesionSizeSource": "user, model or default",
    "MinLesionSizeVoxels": "the minimum size in voxels of this image, or null",
    "Folds": "folds ensembled",
    "TTA": "whether test-time mirroring was on",
    "Device": "cpu or cuda",
    "FastPath": "whether bids_cl's predictor (tile skipping, on-device export) ran",
    "Threads": "CPU threads of the segmentation",
    "Precision": "fp32, fp16 or bf16",
    "Orientation": "voxel axis codes of the input and of the model's training data",
    "TilesRun": "sliding-window tiles computed",
    "TilesTotal": "sliding-window tiles of the image",
    "Inputs": "the discovery record of the target (paths, entities, evidence)",
    "Warnings": "every warning of skull stripping and segmentation",
    "Space": "template spaces the lesion maps were resampled to",
    "GeneratedBy": "bids_cl name and version",
}

# ------------------------------------------------------------------------------------------------
# The log folder of a run: sub-<label>/log/<run_uuid>/

LOG_DIR = "log"
CONFIG_NAME = "bids_cl.toml"          # the run's request and what it resolved ([bids_cl], [resolved])
DISCOVERY_NAME = "discovery.json"     # the discovery record of every target of the participant
LOG_NAME = "bids_cl.log"              # the run's full log
TIMINGS_NAME = "timings.json"         # {prefix: {stage: seconds}} (not in derivatives: differs per run)
RECORDS_DIR = "targets"               # <prefix>.json: the outcome of each target (records.TargetRecord)
NIPYPE_CRASH_DIR = "nipype"           # Nipype's own crash files (tracebacks)
CRASH_PREFIX = "crash-"               # crash-<prefix>.txt: one line per failed target, for people


def log_dir(output_dir: Path, participant: str, run_uuid: str) -> Path:
    """``output_dir/sub-<participant>/log/<run_uuid>``."""
    return Path(output_dir) / f"sub-{participant}" / LOG_DIR / run_uuid


def record_path(run_log_dir: Path, name: str) -> Path:
    """``<run log>/targets/<name>.json``: the record of one target (or one pair of sessions)."""
    return Path(run_log_dir) / RECORDS_DIR / f"{name}.json"


def crash_note_name(prefix: str) -> str:
    return f"{CRASH_PREFIX}{prefix}.txt"


def format_crash_note(prefix: str, reason: str, code: int, crash_files: list[str]) -> str:
    """The crash note of a failed target: ``<prefix>\\texit <code>\\t<reason>``, then its crash files."""
    one_line = " ".join(str(reason).split())
    return f"{prefix}\texit {code}\t{one_line}\n" + "".join(f"crash file: {c}\n" for c in crash_files)


def parse_crash_note(text: str) -> tuple[str, int, str] | None:
    """``(prefix, code, reason)`` of a crash note written by :func:`format_crash_note`, else None."""
    first = text.split("\n", 1)[0]
    parts = first.split("\t")
    if len(parts) == 3 and parts[1].startswith("exit ") and parts[1][5:].isdigit():
        return parts[0], int(parts[1][5:]), parts[2]
    return None


# ------------------------------------------------------------------------------------------------
# Root files and the methods text

DATASET_DESCRIPTION = "dataset_description.json"
BIDSIGNORE = ".bidsignore"
DESCRIPTIONS_TSV = "descriptions.tsv"
CITATION_NAME = "CITATION.md"
BIDSIGNORE_LINES = ("*.html", "figures", "sub-*/log", "sub-*/figures", "*_xfm.h5", "*_xfm.json",
                    "*_stats.tsv", "*_stats.json", "group_*", "evaluation", CITATION_NAME)


def report_name(participant: str) -> str:
    """The participant's HTML report at the derivatives root."""
    return f"sub-{participant}.html"


# ------------------------------------------------------------------------------------------------
# Reference (manual) masks: the layout that bids_cl-train and bids_cl-evaluate read and that the
# phantom generator writes (derivatives/manual_masks/sub-X[/ses-Y]/anat/, same prefix as the image).

REFERENCE: dict[str, Output] = {
    "cl_mask": _o({"label": "CL"}, "mask", ".nii.gz", "Manual cortical lesion mask (binary)"),
    "wml_mask": _o({"label": "WML"}, "mask", ".nii.gz", "Manual white-matter lesion mask (binary)"),
    "brain_mask": _o({"desc": "brain"}, "mask", ".nii.gz", "Brain mask of the annotated image"),
    "lesions_dseg": _o({"desc": "lesions"}, "dseg", ".nii.gz",
                       "Every manual lesion, valued by its lesion_id"),
    "lesions_table": _o({"desc": "lesions"}, "stats", ".tsv",
                        "One row per manual lesion: lesion_id, type, label CL|WML, volume, centroid"),
}


def reference_name(prefix: str, key: str) -> str:
    """The file name of reference file ``key`` (a key of :data:`REFERENCE`) of the image ``prefix``."""
    return REFERENCE[key].name(prefix)


def suffix_of(key: str, table: dict[str, Output] | None = None) -> str:
    """What follows the prefix in names of ``key`` (``_label-CL_mask.nii.gz``), for globs and pairing."""
    return "_" + (table or OUTPUTS)[key].name("").lstrip("_")

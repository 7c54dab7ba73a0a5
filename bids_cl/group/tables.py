"""Group tables from the participant outputs: one row per image, one row per lesion, status per
participant, joined with ``participants.tsv``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bids_cl.derivatives.reader import (
    TargetOutputs,
    collect_targets,
    model_name,
    model_warning,
    natural_key,
    output_participants,
    participant_label,
    participant_status,
    read_json,
)
from bids_cl.derivatives.spec import LESION_COLUMNS, LESION_TABLE_DICTIONARY, report_name

IMAGE_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "participant (BIDS label with sub- prefix)"},
    "session_id": {"Description": "session (with ses- prefix); n/a for data without sessions"},
    "prefix": {"Description": "BIDS entity string of the target image; every derivative of it "
                              "starts with it"},
    "target_suffix": {"Description": "suffix of the segmented image",
                      "Levels": {"UNIT1": "MP2RAGE uniform image", "T1w": "T1-weighted image"}},
    "sequence": {"Description": "acquisition sequence of the target",
                 "Levels": {"MP2RAGE": "MP2RAGE", "MPRAGE": "MPRAGE"}},
    "field_strength": {"Description": "magnetic field strength", "Units": "T"},
    "skull_strip_strategy": {"Description": "skull-stripping strategy that made the brain mask"},
    "model_name": {"Description": "segmentation model (from the summary's Model provenance)"},
    "model_version": {"Description": "segmentation model version"},
    "model_warning": {"Description": "warning attached to the model (e.g. demo model), n/a if none"},
    "ood_warning": {"Description": "out-of-distribution warning for this image, n/a if none"},
    "lesion_count": {"Description": "number of detected cortical lesions"},
    "total_volume_ul": {"Description": "total cortical lesion volume", "Units": "uL"},
    "median_volume_ul": {"Description": "median lesion volume; n/a without lesions",
                         "Units": "uL"},
    "threshold": {"Description": "probability threshold of the lesion mask"},
    "connectivity": {"Description": "voxel connectivity used to separate lesions (6, 18, 26)"},
    "min_lesion_size": {"Description": "smallest lesion kept, as given (voxels, or a volume such as 80uL); "
                                       "n/a when every lesion was kept"},
    "min_lesion_size_voxels": {"Description": "smallest lesion kept, in voxels of this image; n/a when every "
                                              "lesion was kept"},
    "spaces": {"Description": "template spaces with lesion masks (comma separated)"},
    "n_warnings": {"Description": "number of warnings in the summary"},
    "bids_cl_version": {"Description": "bids_cl version that produced the outputs"},
}
# The per-lesion columns are described once, where the participant tables are written.
LESION_DICTIONARY: dict[str, dict[str, Any]] = {
    "participant_id": IMAGE_COLUMNS["participant_id"],
    "session_id": IMAGE_COLUMNS["session_id"],
    "prefix": IMAGE_COLUMNS["prefix"],
    **LESION_TABLE_DICTIONARY,
}
STATUS_COLUMNS = ["participant_id", "status", "n_targets", "missing_targets", "reason",
                  "report", "crash_files"]


def read_participants(bids_dir: Path | None) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """``participants.tsv`` (all columns as read; ``n/a`` missing) and its JSON sidecar."""
    if bids_dir is None:
        return None, {}
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        return None, {}
    frame = pd.read_csv(path, sep="\t", dtype=str, na_values=["n/a", ""], keep_default_na=False)
    if "participant_id" not in frame.columns:
        return None, {}
    frame["participant_id"] = frame["participant_id"].map(
        lambda v: v if str(v).startswith("sub-") else f"sub-{v}")
    # Numbers back to numbers (dtype=str above keeps labels such as "01" intact).
    for col in frame.columns:
        if col == "participant_id":
            continue
        converted = pd.to_numeric(frame[col], errors="coerce")
        if converted.notna().sum() == frame[col].notna().sum():
            frame[col] = converted
    sidecar = read_json(path.with_suffix(".json")) if path.with_suffix(".json").exists() else {}
    return frame, sidecar if isinstance(sidecar, dict) else {}


def participant_universe(bids_dir: Path | None, out_dir: Path,
                         participants: pd.DataFrame | None,
                         participant_labels: Iterable[str] | None) -> list[str]:
    """Labels to report on: the requested ones, else everyone in participants.tsv, the BIDS
    folder or the output folder (so participants that were never processed show as missing)."""
    if participant_labels:
        labels = [participant_label(p) for p in participant_labels]
    else:
        labels = list(output_participants(out_dir))
        if participants is not None:
            labels += [p[4:] for p in participants["participant_id"]]
        if bids_dir is not None and Path(bids_dir).is_dir():
            labels += [p.name[4:] for p in Path(bids_dir).glob("sub-*") if p.is_dir()]
    return sorted(dict.fromkeys(labels), key=natural_key)


def _model_version(model: Any) -> str | None:
    if isinstance(model, Mapping):
        for key in ("version", "Version"):
            if model.get(key) is not None:
                return str(model[key])
    return None


def _number(value: Any) -> float:
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def image_row(target: TargetOutputs) -> dict[str, Any]:
    s = target.summary
    generated = s.get("GeneratedBy") if isinstance(s.get("GeneratedBy"), Mapping) else {}
    return {
        "participant_id": f"sub-{target.participant}",
        "session_id": f"ses-{target.session}" if target.session else None,
        "prefix": target.prefix,
        "target_suffix": target.inputs.get("target_suffix"),
        "sequence": s.get("Sequence"),
        "field_strength": _number(s.get("FieldStrength")),
        "skull_strip_strategy": s.get("SkullStripStrategy"),
        "model_name": model_name(s.get("Model")),
        "model_version": _model_version(s.get("Model")),
        "model_warning": model_warning(s.get("Model")),
        "ood_warning": s.get("OODWarning") or None,
        "lesion_count": _number(s.get("LesionCount")),
        "total_volume_ul": _number(s.get("TotalVolume_uL")),
        # The summary writes 0 without lesions; a median of no lesion is undefined (n/a) for the stats.
        "median_volume_ul": _number(s.get("MedianVolume_uL")) if s.get("LesionCount") else np.nan,
        "threshold": _number(s.get("Threshold")),
        "connectivity": _number(s.get("Connectivity")),
        # The size as given: a volume ("80uL", e.g. the model's tuned size) is not a plain number.
        "min_lesion_size": None if s.get("MinLesionSize") is None else str(s.get("MinLesionSize")),
        "min_lesion_size_voxels": _number(s.get("MinLesionSizeVoxels")) or np.nan,
        "spaces": ",".join(target.spaces) or None,
        "n_warnings": len(s.get("Warnings") or []),
        "bids_cl_version": generated.get("Version"),
    }


def collect(out_dir: Path, labels: Iterable[str]
            ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, list[TargetOutputs]]:
    """(images, lesions, status, targets) for the given participants, from the outputs alone."""
    out_dir = Path(out_dir)
    images, lesion_parts, status_rows, all_targets = [], [], [], []
    for label in labels:
        targets = collect_targets(out_dir, label)
        status = participant_status(out_dir, label, targets)
        report = out_dir / report_name(label)
        status_rows.append({
            "participant_id": f"sub-{label}", "status": status.status,
            "n_targets": status.n_targets,
            "missing_targets": ",".join(status.missing_targets) or None,
            "reason": status.reason or None,
            "report": report.name if report.exists() else None,
            "crash_files": ",".join(status.crash_files) or None,
        })
        for target in targets:
            all_targets.append(target)
            images.append(image_row(target))
            lesions = target.lesions()
            if not lesions.empty:
                lesions = lesions.copy()
                lesions.insert(0, "prefix", target.prefix)
                lesions.insert(0, "session_id", f"ses-{target.session}" if target.session
                               else None)
                lesions.insert(0, "participant_id", f"sub-{label}")
                lesion_parts.append(lesions)
    image_table = pd.DataFrame(images, columns=list(IMAGE_COLUMNS))
    for col in ("lesion_count", "n_warnings"):
        image_table[col] = image_table[col].astype("Int64")
    lesion_columns = ["participant_id", "session_id", "prefix", *LESION_COLUMNS]
    lesion_table = pd.concat(lesion_parts, ignore_index=True) if lesion_parts else \
        pd.DataFrame(columns=lesion_columns)
    status_table = pd.DataFrame(status_rows, columns=STATUS_COLUMNS)
    return image_table, lesion_table, status_table, all_targets


def join_participants(images: pd.DataFrame, participants: pd.DataFrame | None
                      ) -> tuple[pd.DataFrame, dict[str, str]]:
    """Left-join participants.tsv on ``participant_id``; clashing column names get a
    ``participants_`` prefix. Returns the table and the {participants.tsv column: new name} map."""
    if participants is None or participants.empty:
        return images, {}
    renames = {c: (f"participants_{c}" if c in images.columns else c)
               for c in participants.columns if c != "participant_id"}
    # A duplicated participant_id would duplicate images: keep its first row.
    unique = participants.drop_duplicates("participant_id")
    joined = images.merge(unique.rename(columns=renames), on="participant_id", how="left")
    return joined, renames


def data_dictionary(columns: Iterable[str], base: Mapping[str, Mapping[str, Any]],
                    participants_sidecar: Mapping[str, Any] | None = None,
                    renames: Mapping[str, str] | None = None) -> dict[str, Any]:
    """BIDS-style column descriptions: ours first, participants.tsv columns from its sidecar."""
    by_new_name = {new: old for old, new in (renames or {}).items()}
    out: dict[str, Any] = {}
    for col in columns:
        if col in base:
            out[col] = dict(base[col])
        elif col in by_new_name:
            source = (participants_sidecar or {}).get(by_new_name[col])
            out[col] = dict(source) if isinstance(source, Mapping) else {
                "Description": f"'{by_new_name[col]}' from participants.tsv"}
        else:
            out[col] = {"Description": col.replace("_", " ")}
    return out

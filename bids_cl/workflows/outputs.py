"""The one writer of derivatives: names, sidecars and atomic writes of everything in ``output_dir``.

Every file is written to a temporary name in its destination folder and renamed into place, so a run
killed at any moment leaves either the previous file or the complete new one, never half a file.
Contents are deterministic (no timestamps, gzip headers without mtime): rerunning gives identical bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

from bids_cl import __version__
from bids_cl.utils.bids import WorkItem
from bids_cl.utils.io import atomic_save_nifti, atomic_write, atomic_write_json, atomic_write_text

PIPELINE_NAME = "bids_cl"
CODE_URL = "https://github.com/bids-cl/bids_cl"
BIDS_VERSION = "1.10.0"

DESCRIPTIONS = {
    "brain": "Brain mask from skull stripping of the segmented T1-weighted image",
    "preproc": "Skull-stripped T1-weighted image (MP2RAGE UNI or MPRAGE) fed to the lesion model",
    "lesions": "Per-lesion measurements of the cortical lesion mask (one row per lesion)",
    "summary": "Per-image summary of the cortical lesion segmentation (lesion count, volumes)",
}

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


def bids_uri(item_path: str, bids_dir: Path) -> str:
    """``bids:raw:<relative path>`` for a file of the input dataset (DatasetLinks names 'raw')."""
    try:
        rel = Path(item_path).resolve().relative_to(bids_dir.resolve())
    except ValueError:
        return str(item_path)
    return f"bids:raw:{rel.as_posix()}"


def generated_by(model_provenance: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    import os

    entry: dict[str, Any] = {
        "Name": PIPELINE_NAME,
        "Version": __version__,
        "Description": "Cortical lesion segmentation in multiple sclerosis with nnU-Net v2",
        "CodeURL": CODE_URL,
    }
    container = os.environ.get("BIDS_CL_CONTAINER")
    if container:
        entry["Container"] = {"Type": container, "Tag": f"bids_cl:{__version__}"}
    out = [entry]
    if model_provenance:
        model_entry = {
            "Name": f"model: {model_provenance.get('name') or 'nnU-Net'}",
            "Description": str(model_provenance.get("description")
                               or "nnU-Net v2 cortical lesion model"),
        }
        if model_provenance.get("version"):
            model_entry["Version"] = str(model_provenance["version"])
        out.append(model_entry)
    return out


def write_dataset_description(output_dir: Path, bids_dir: Path,
                              model_provenance: dict[str, Any] | None = None) -> Path:
    """dataset_description.json, .bidsignore and descriptions.tsv at the derivatives root."""
    source: dict[str, Any] = {"URL": bids_dir.resolve().as_uri()}
    try:
        raw = json.loads((bids_dir / "dataset_description.json").read_text())
        if raw.get("DatasetDOI"):
            source["DOI"] = raw["DatasetDOI"]
        if raw.get("Name"):
            source["Name"] = raw["Name"]
    except (OSError, json.JSONDecodeError):
        pass
    description = {
        "Name": "bids_cl cortical lesion segmentation",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": generated_by(model_provenance),
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": bids_dir.resolve().as_uri()},
        "HowToAcknowledge": "Cite Molchanova et al., NeuroImage: Clinical 2026 (arXiv 2507.12092) "
                            "for the model and bids_cl for the pipeline.",
    }
    path = atomic_write_json(output_dir / "dataset_description.json", description)
    # The validator matches folder entries without a trailing slash. Transforms follow the NiPreps
    # `_xfm` convention, which the BIDS schema does not cover yet; tables and logs are not BIDS files.
    atomic_write_text(output_dir / ".bidsignore",
                      "*.html\nfigures\nsub-*/log\nsub-*/figures\n*_xfm.h5\n*_xfm.json\n"
                      "*_stats.tsv\n*_stats.json\ngroup_*\nevaluation\n")
    rows = ["desc_id\tdescription"] + [f"desc-{k}\t{v}" for k, v in DESCRIPTIONS.items()]
    atomic_write_text(output_dir / "descriptions.tsv", "\n".join(rows) + "\n")
    return path


def _json_for(nifti: Path) -> Path:
    name = nifti.name
    for ext in (".nii.gz", ".nii", ".tsv", ".h5", ".mat"):
        if name.endswith(ext):
            return nifti.with_name(name[: -len(ext)] + ".json")
    return nifti.with_suffix(".json")


def _copy_nifti(src: str | Path, dst: Path, dtype: Any | None = None) -> Path:
    """Re-save with a deterministic gzip header; cast masks to uint8 and maps to float32."""
    img = nib.load(str(src))
    if dtype is not None:
        data = np.asanyarray(img.dataobj).astype(dtype)
        header = img.header.copy()
        header.set_data_dtype(dtype)
        header.set_slope_inter(1.0, 0.0)
        img = nib.Nifti1Image(data, img.affine, header)
    return atomic_save_nifti(img, dst)


def _copy_h5(src: str | Path, dst: Path) -> Path:
    """Copy an ITK HDF5 transform without the object timestamps HDF5 records by default.

    ITK writes creation times into the file, so the same transform computed twice would differ in
    bytes; the copy keeps every group, dataset and attribute, so ITK/ANTs read it unchanged.
    """
    import h5py

    def _copy_group(group_in: Any, group_out: Any) -> None:
        for key, value in group_in.attrs.items():
            group_out.attrs[key] = value
        for name, obj in group_in.items():
            if isinstance(obj, h5py.Group):
                _copy_group(obj, group_out.create_group(name, track_order=True))
            else:
                dataset = group_out.create_dataset(name, data=obj[()], track_times=False)
                for key, value in obj.attrs.items():
                    dataset.attrs[key] = value

    def _write(tmp: Path) -> None:
        with h5py.File(src, "r") as fin, h5py.File(tmp, "w", track_order=True) as fout:
            _copy_group(fin, fout)

    return atomic_write(dst, _write)


def derivative_path(output_dir: Path, item: WorkItem, name: str) -> Path:
    """``output_dir/sub-X[/ses-Y]/anat/<prefix>_<name>``."""
    return output_dir / item.anat_dir / f"{item.prefix}_{name}"


def write_target_derivatives(
    output_dir: Path,
    bids_dir: Path,
    item: WorkItem,
    *,
    brain: str,
    brain_mask: str,
    skullstrip_info: dict[str, Any],
    probseg: str,
    lesion_mask: str,
    lesions_tsv: str,
    segment_info: dict[str, Any],
    templates: dict[str, dict[str, str]] | None = None,
) -> list[Path]:
    """Write every derivative of one segmentation target; returns the written paths.

    ``templates`` maps a space name to ``{"mask", "probseg", "xfm", "lesions_tsv"}`` files.
    The summary JSON is written last: its presence marks the target as complete.
    """
    written: list[Path] = []
    target_uri = bids_uri(item.target, bids_dir)
    strip_sources = [target_uri]
    if skullstrip_info.get("used_inv2") and item.inv2:
        strip_sources.append(bids_uri(item.inv2, bids_dir))
    provenance = segment_info.get("provenance", {})
    model_brief = {k: provenance[k] for k in ("name", "source", "doi", "trainer", "plans",
                                               "configuration", "folds", "warning")
                   if k in provenance}

    path = derivative_path(output_dir, item, "desc-brain_mask.nii.gz")
    written.append(_copy_nifti(brain_mask, path, np.uint8))
    written.append(atomic_write_json(_json_for(path), {
        "Type": "Brain",
        "Sources": strip_sources,
        "SkullStripStrategy": skullstrip_info.get("strategy"),
        "SkullStripDetail": skullstrip_info.get("detail"),
    }))

    path = derivative_path(output_dir, item, "desc-preproc_T1w.nii.gz")
    written.append(_copy_nifti(brain, path, np.float32))
    written.append(atomic_write_json(_json_for(path), {
        "SkullStripped": True,
        "Sources": strip_sources,
        "Description": DESCRIPTIONS["preproc"],
        "Sequence": item.sequence,
        "SkullStripStrategy": skullstrip_info.get("strategy"),
    }))

    seg_common = {
        "Sources": [target_uri, f"bids::{item.anat_dir}/{item.prefix}_desc-preproc_T1w.nii.gz"],
        "Model": model_brief,
        "Folds": segment_info.get("folds"),
        "TestTimeAugmentation": segment_info.get("tta"),
        "Device": segment_info.get("device"),
    }
    path = derivative_path(output_dir, item, "label-CL_probseg.nii.gz")
    written.append(_copy_nifti(probseg, path, np.float32))
    written.append(atomic_write_json(_json_for(path), {
        "Description": "Ensemble (mean over folds) probability of cortical lesion",
        **seg_common,
    }))

    path = derivative_path(output_dir, item, "label-CL_mask.nii.gz")
    written.append(_copy_nifti(lesion_mask, path, np.uint8))
    mask_meta = {
        "Type": "Lesion",
        "Description": "Cortical lesions (leukocortical, intracortical, juxtacortical), binary",
        **seg_common,
        "Threshold": segment_info.get("threshold"),
        "ThresholdSource": segment_info.get("threshold_source"),
        "Connectivity": segment_info.get("connectivity"),
        "MinLesionSize": segment_info.get("min_lesion_size"),
        "MinLesionSizeSource": segment_info.get("min_lesion_size_source"),
    }
    written.append(atomic_write_json(_json_for(path), mask_meta))

    lesions = pd.read_csv(lesions_tsv, sep="\t")
    spaces: list[str] = []
    for space, files in (templates or {}).items():
        spaces.append(space)
        space_path = derivative_path(output_dir, item, f"space-{space}_label-CL_mask.nii.gz")
        written.append(_copy_nifti(files["mask"], space_path, np.uint8))
        written.append(atomic_write_json(_json_for(space_path), {
            **mask_meta, "Description": f"Cortical lesion mask resampled to {space} "
            "(nearest neighbour)", "SpatialReference": space}))
        space_path = derivative_path(output_dir, item, f"space-{space}_label-CL_probseg.nii.gz")
        written.append(_copy_nifti(files["probseg"], space_path, np.float32))
        written.append(atomic_write_json(_json_for(space_path), {
            **seg_common, "Description": f"Lesion probability resampled to {space} (linear)",
            "SpatialReference": space}))
        if files.get("t1w"):
            space_path = derivative_path(output_dir, item, f"space-{space}_desc-preproc_T1w.nii.gz")
            written.append(_copy_nifti(files["t1w"], space_path, np.float32))
            written.append(atomic_write_json(_json_for(space_path), {
                "SkullStripped": True, "SpatialReference": space,
                "Description": f"Skull-stripped T1-weighted image registered to {space} (linear)",
                "Sources": [f"bids::{item.anat_dir}/{item.prefix}_desc-preproc_T1w.nii.gz"]}))
        xfm_path = derivative_path(output_dir, item, f"from-T1w_to-{space}_mode-image_xfm.h5")
        written.append(_copy_h5(files["xfm"], xfm_path))
        written.append(atomic_write_json(_json_for(xfm_path), {
            "FromSpace": "T1w", "ToSpace": space,
            "Method": "antspyx affine + SyN (fixed seed), composite ITK transform",
            "Sources": [f"bids::{item.anat_dir}/{item.prefix}_desc-preproc_T1w.nii.gz"],
        }))
        if files.get("lesions_tsv"):
            # Template coordinates come from the first space only (the table has one set).
            with_coords = pd.read_csv(files["lesions_tsv"], sep="\t")
            if len(spaces) == 1 and len(with_coords) == len(lesions):
                lesions = with_coords

    path = derivative_path(output_dir, item, "label-CL_desc-lesions_stats.tsv")
    written.append(atomic_write_text(path, lesions.to_csv(sep="\t", index=False,
                                                          float_format="%.6g")))
    dictionary = {c: dict(LESION_TABLE_DICTIONARY.get(c, {"Description": c})) for c in lesions.columns}
    if spaces:
        for c in ("template_x", "template_y", "template_z"):
            if c in dictionary:
                dictionary[c]["Description"] += f" ({spaces[0]})"
    written.append(atomic_write_json(_json_for(path), dictionary))

    engine_summary = dict(segment_info.get("summary", {}))
    summary = {
        "LesionCount": int(len(lesions)),
        "TotalVolume_uL": float(lesions["volume_ul"].sum()) if len(lesions) else 0.0,
        "MedianVolume_uL": float(lesions["volume_ul"].median()) if len(lesions) else 0.0,
        # Timings differ from run to run: they go to the log, so derivatives are byte-identical.
        **{k: v for k, v in engine_summary.items()
           if k not in ("LesionCount", "TotalVolume_uL", "MedianVolume_uL", "Timings")},
        "Sequence": item.sequence,
        "FieldStrength": item.field_strength,
        "SkullStripStrategy": skullstrip_info.get("strategy"),
        "Model": provenance,
        "Threshold": segment_info.get("threshold"),
        "Connectivity": segment_info.get("connectivity"),
        "MinLesionSize": segment_info.get("min_lesion_size"),
        "Inputs": item.to_dict(),
        "Warnings": [*skullstrip_info.get("warnings", []), *segment_info.get("warnings", [])],
        "Space": spaces,
        "GeneratedBy": {"Name": PIPELINE_NAME, "Version": __version__},
    }
    path = derivative_path(output_dir, item, "label-CL_desc-summary_stats.json")
    written.append(atomic_write_json(path, summary))
    return written


def write_participant_log(output_dir: Path, participant: str, run_uuid: str, *,
                          config_toml: str, items: list[WorkItem]) -> Path:
    """``sub-X/log/<run_uuid>/``: the run's configuration and discovery record."""
    log_dir = output_dir / f"sub-{participant}" / "log" / run_uuid
    atomic_write_text(log_dir / "bids_cl.toml", config_toml)
    atomic_write_json(log_dir / "discovery.json", [i.to_dict() for i in items])
    return log_dir


def write_crash_note(log_dir: Path, prefix: str, reason: str, code: int, crash_files: list[str]
                     ) -> Path:
    """A one-line reason per failed target, for the report and the user."""
    text = f"{prefix}\texit {code}\t{reason}\n" + "".join(f"crash file: {c}\n" for c in crash_files)
    return atomic_write_text(log_dir / f"crash-{prefix}.txt", text)


def write_timings(log_dir: Path, timings: dict[str, dict[str, float]]) -> Path:
    """Per-target stage timings of this run (kept out of the derivatives: they differ per run)."""
    return atomic_write_json(log_dir / "timings.json", timings)

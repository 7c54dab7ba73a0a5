"""A small constructed derivatives folder (tests and documentation screenshots of the reports).

``make_fake_derivatives(root)`` writes, in a few seconds and without any model:

* ``root/bids``: ``participants.tsv`` (+ JSON: age, sex, site, diagnosis) for sub-01..05 and raw
  ``*_UNIT1``/``*_T1w`` images (40^3 voxels, LAS orientation, head with skull);
* ``root/out``: derivatives following docs/dev/architecture.md for sub-01..03 x ses-01/02 (brain
  mask, preproc, lesion mask/probseg/table/summary, template-space masks), sub-04 *failed* (crash
  file, discovery.json, no outputs) and sub-05 *missing* (no folder at all);
* ``root/templates``: a 40^3 RAS "template" T1w + mask standing in for MNI152NLin2009cAsym.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

SPACE = "MNI152NLin2009cAsym"
SHAPE = (40, 40, 40)
# LAS voxel order (i runs right-to-left): the figures must reorient to RAS themselves.
NATIVE_AFFINE = np.array([[-1.0, 0, 0, 20], [0, 1.0, 0, -20], [0, 0, 1.0, -20], [0, 0, 0, 1]])
TEMPLATE_AFFINE = np.array([[1.0, 0, 0, -20], [0, 1.0, 0, -20], [0, 0, 1.0, -20], [0, 0, 0, 1]])
TIMINGS = {"skullstrip": 11.8, "segment": 42.5, "postprocess": 0.9, "register": 31.2}
MODEL = {"name": "bids_cl-demo", "version": "0.1.0", "folds": [0], "sha256": "0" * 64,
         "warning": "demo model trained on phantoms only: not for research or clinical use"}

# participant -> (sequence, suffix, field strength, lesions per session, raw image kept?)
DESIGN: dict[str, tuple[str, str, float, tuple[int, int], bool]] = {
    "01": ("MP2RAGE", "UNIT1", 7.0, (4, 6), True),
    "02": ("MP2RAGE", "UNIT1", 3.0, (7, 9), True),
    "03": ("MPRAGE", "T1w", 3.0, (0, 1), False),  # raw image gone: report falls back to preproc
}


@dataclass
class FakeDataset:
    root: Path
    bids_dir: Path
    out_dir: Path
    template_t1w: Path
    template_mask: Path
    counts: dict[str, int] = field(default_factory=dict)   # prefix -> lesion count
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def templates(self) -> dict[str, tuple[Path, Path]]:
        return {SPACE: (self.template_t1w, self.template_mask)}


def _grid() -> tuple[np.ndarray, ...]:
    return np.meshgrid(*(np.arange(n) - (n - 1) / 2 for n in SHAPE), indexing="ij")


def _head(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image with skull, brain mask, cortex shell) as arrays on the 40^3 grid."""
    x, y, z = _grid()
    r = np.sqrt((x / 15) ** 2 + (y / 17) ** 2 + (z / 14) ** 2)
    brain = r < 1.0
    cortex = brain & (r > 0.78)
    skull = (r > 1.12) & (r < 1.27)
    img = np.zeros(SHAPE, np.float32)
    img[brain] = 900.0                 # white matter
    img[cortex] = 600.0                # grey matter
    img[(r < 0.25)] = 300.0            # "ventricles"
    img[skull] = 1100.0
    img = ndimage.gaussian_filter(img, 0.8) + rng.normal(0, 25, SHAPE).astype(np.float32)
    return np.clip(img, 0, None).astype(np.float32), brain, cortex


def _lesions(rng: np.random.Generator, cortex: np.ndarray, n: int) -> np.ndarray:
    """``n`` separate small blobs in the cortex shell (distinct components under 26-connectivity)."""
    mask = np.zeros(SHAPE, bool)
    candidates = np.argwhere(ndimage.binary_erosion(cortex, iterations=1))
    x, y, z = np.indices(SHAPE)
    placed = 0
    for idx in rng.permutation(len(candidates)):
        if placed == n:
            break
        c = candidates[idx]
        radius = rng.uniform(1.0, 2.6)
        blob = (x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2 <= radius ** 2
        if (ndimage.binary_dilation(mask, iterations=2) & blob).any():
            continue
        mask |= blob
        placed += 1
    return mask


def lesion_table(mask: np.ndarray, prob: np.ndarray, affine: np.ndarray,
                 template_shift: np.ndarray | None = None) -> pd.DataFrame:
    """The per-lesion table of the contract, computed like the engine does (26-connectivity)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    voxel_ul = float(abs(np.linalg.det(affine[:3, :3])))
    rows = []
    for lesion_id in range(1, n + 1):
        idx = np.argwhere(labels == lesion_id)
        centroid = idx.mean(0)
        xyz = (affine @ np.array([*centroid, 1.0]))[:3]
        p = prob[labels == lesion_id]
        row = {"lesion_id": lesion_id, "voxels": len(idx), "volume_ul": len(idx) * voxel_ul,
               "centroid_i": centroid[0], "centroid_j": centroid[1], "centroid_k": centroid[2],
               "centroid_x": xyz[0], "centroid_y": xyz[1], "centroid_z": xyz[2],
               "bbox_i0": idx[:, 0].min(), "bbox_j0": idx[:, 1].min(), "bbox_k0": idx[:, 2].min(),
               "bbox_i1": idx[:, 0].max() + 1, "bbox_j1": idx[:, 1].max() + 1,
               "bbox_k1": idx[:, 2].max() + 1, "mean_prob": float(p.mean()),
               "max_prob": float(p.max()), "uncertainty": float(p.std())}
        if template_shift is not None:
            row.update(template_x=xyz[0] + template_shift[0], template_y=xyz[1] + template_shift[1],
                       template_z=xyz[2] + template_shift[2])
        rows.append(row)
    return pd.DataFrame(rows, columns=[
        "lesion_id", "voxels", "volume_ul", "centroid_i", "centroid_j", "centroid_k",
        "centroid_x", "centroid_y", "centroid_z", "bbox_i0", "bbox_j0", "bbox_k0", "bbox_i1",
        "bbox_j1", "bbox_k1", "mean_prob", "max_prob", "uncertainty"]
        + (["template_x", "template_y", "template_z"] if template_shift is not None else []))


def _save(data: np.ndarray, affine: np.ndarray, path: Path, dtype: Any = np.float32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))
    return path


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def make_template(root: Path) -> tuple[Path, Path]:
    img, brain, _ = _head(np.random.default_rng(1234))
    t1w = _save(img, TEMPLATE_AFFINE, root / "templates" / f"tpl-{SPACE}_res-01_T1w.nii.gz")
    mask = _save(brain, TEMPLATE_AFFINE, root / "templates" /
                 f"tpl-{SPACE}_res-01_desc-brain_mask.nii.gz", np.uint8)
    return t1w, mask


def make_fake_derivatives(root: str | Path, *, seed: int = 0) -> FakeDataset:
    root = Path(root)
    bids_dir, out_dir = root / "bids", root / "out"
    t1w, tmask = make_template(root)
    ds = FakeDataset(root, bids_dir, out_dir, t1w, tmask)
    rng = np.random.default_rng(seed)

    participants = pd.DataFrame({
        "participant_id": [f"sub-0{i}" for i in range(1, 6)],
        "age": [34, 51, 28, 45, 39], "sex": ["F", "M", "F", "M", "F"],
        "site": ["A", "A", "B", "B", "A"], "diagnosis": ["RRMS", "SPMS", "RRMS", "PPMS", "RRMS"],
    })
    bids_dir.mkdir(parents=True, exist_ok=True)
    participants.to_csv(bids_dir / "participants.tsv", sep="\t", index=False)
    _write_json(bids_dir / "participants.json", {
        "age": {"Description": "age at baseline", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
        "site": {"Description": "acquisition site", "Levels": {"A": "site A", "B": "site B"}},
        "diagnosis": {"Description": "MS phenotype"}})
    _write_json(bids_dir / "dataset_description.json",
                {"Name": "fake", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    _write_json(out_dir / "dataset_description.json", {
        "Name": "bids_cl outputs", "BIDSVersion": "1.10.0", "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "bids_cl", "Version": "0.1.0",
                         "Container": {"Type": "docker", "Tag": "bids_cl:0.1.0"}}]})

    for sub, (sequence, suffix, field_t, per_session, keep_raw) in DESIGN.items():
        run_dir = out_dir / f"sub-{sub}" / "log" / f"run-{sub}"
        items = []
        for s_idx, n_lesions in enumerate(per_session):
            ses = f"0{s_idx + 1}"
            prefix = f"sub-{sub}_ses-{ses}"
            anat = out_dir / f"sub-{sub}" / f"ses-{ses}" / "anat"
            raw = bids_dir / f"sub-{sub}" / f"ses-{ses}" / "anat" / f"{prefix}_{suffix}.nii.gz"
            head, brain, cortex = _head(rng)
            lesions = _lesions(rng, cortex, n_lesions)
            head[lesions] *= 0.7  # CLs are hypointense on T1w
            if keep_raw:
                _save(head, NATIVE_AFFINE, raw)
            prob = np.clip(ndimage.gaussian_filter(lesions.astype(np.float32), 0.7) * 1.6, 0, 1)
            prob[lesions] = np.maximum(prob[lesions], 0.55)
            _save(brain, NATIVE_AFFINE, anat / f"{prefix}_desc-brain_mask.nii.gz", np.uint8)
            _write_json(anat / f"{prefix}_desc-brain_mask.json",
                        {"Type": "Brain", "SkullStripStrategy": "synthstrip"})
            _save(head * brain, NATIVE_AFFINE, anat / f"{prefix}_desc-preproc_T1w.nii.gz")
            _save(prob, NATIVE_AFFINE, anat / f"{prefix}_label-CL_probseg.nii.gz")
            _save(lesions, NATIVE_AFFINE, anat / f"{prefix}_label-CL_mask.nii.gz", np.uint8)
            # "Registration": the template grid is the native grid flipped left-right (RAS).
            _save(lesions[::-1], TEMPLATE_AFFINE,
                  anat / f"{prefix}_space-{SPACE}_label-CL_mask.nii.gz", np.uint8)
            if sub == "01":  # only sub-01 has its warped T1w: both registration figures are drawn
                _save((head * brain)[::-1], TEMPLATE_AFFINE,
                      anat / f"{prefix}_space-{SPACE}_desc-preproc_T1w.nii.gz")
            table = lesion_table(lesions, prob, NATIVE_AFFINE, np.zeros(3))
            table.to_csv(anat / f"{prefix}_label-CL_desc-lesions_stats.tsv", sep="\t",
                         index=False, na_rep="n/a", float_format="%.4f")
            item = {"participant": sub, "session": ses, "target": str(raw),
                    "target_suffix": suffix, "entities": {"subject": sub, "session": ses},
                    "prefix": prefix, "sequence": sequence,
                    "evidence": [f"suffix {suffix}"], "field_strength": field_t,
                    "inv1": None, "inv2": None, "t1map": None}
            items.append(item)
            vols = table["volume_ul"]
            summary = {
                "LesionCount": int(len(table)),
                "TotalVolume_uL": float(vols.sum()),
                "MedianVolume_uL": float(vols.median()) if len(vols) else None,
                "Sequence": sequence, "FieldStrength": field_t,
                "SkullStripStrategy": "synthstrip", "Model": MODEL,
                "OODWarning": ("image intensities outside the training range"
                               if (sub, ses) == ("02", "02") else None),
                "Threshold": 0.5, "Connectivity": 26, "MinLesionSize": 3, "Inputs": item,
                "Timings": TIMINGS,
                # as the engine writes them: the model's own warning first, then its own findings
                "Warnings": [MODEL["warning"], "the fold predictions disagree on 2 lesions"],
                "Space": [SPACE],
                "GeneratedBy": {"Name": "bids_cl", "Version": "0.1.0"},
            }
            if sub == "03":  # as the workflow does: timings in the run's log, not the summary
                del summary["Timings"]
            _write_json(anat / f"{prefix}_label-CL_desc-summary_stats.json", summary)
            ds.counts[prefix] = int(len(table))
        _write_json(run_dir / "discovery.json", items)
        if sub == "03":
            _write_json(run_dir / "timings.json", {i["prefix"]: TIMINGS for i in items})
        (run_dir / "bids_cl.toml").write_text('[execution]\nbids_dir = "bids"\n', encoding="utf-8")
        ds.ok.append(sub)

    # sub-04: both targets failed (crash file, discovery.json, no anat outputs).
    run_dir = out_dir / "sub-04" / "log" / "run-04"
    _write_json(run_dir / "discovery.json", [
        {"participant": "04", "session": s, "prefix": f"sub-04_ses-{s}"} for s in ("01", "02")])
    # The workflow's crash note: "<prefix>\texit <code>\t<reason>" then details.
    (run_dir / "crash-sub-04_ses-01.txt").write_text(
        "sub-04_ses-01\texit 65\tinput data unusable: image is 2D (1 slice)\n"
        "Traceback (most recent call last):\n  File \"segment.py\", line 1\n"
        "ValueError: expected a 3D image <with brackets & ampersand>\n", encoding="utf-8")
    (run_dir / "crash-sub-04_ses-02.txt").write_text(
        "sub-04_ses-02: input data unusable: image is 2D (1 slice)\n", encoding="utf-8")
    ds.failed.append("04")
    ds.missing.append("05")
    return ds


def main(argv: list[str] | None = None) -> int:
    """``python -m bids_cl.reports.testing DIR [--screenshots DOCS_IMG]``: build the constructed
    derivatives, their participant reports and group level (and the docs screenshots)."""
    import argparse

    from bids_cl.group import run_group_level
    from bids_cl.reports import generate_reports

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for report_participant.png and report_group.png")
    args = parser.parse_args(argv)
    ds = make_fake_derivatives(args.root)
    generate_reports(ds.out_dir, templates=ds.templates, template_lookup=False)
    result = run_group_level(ds.bids_dir, ds.out_dir, templates=ds.templates,
                             template_lookup=False)
    print(f"reports in {ds.out_dir}; group page {result.html}")
    if args.screenshots is not None:
        from PIL import Image

        from bids_cl.reports.browser import screenshot

        shots = [screenshot(ds.out_dir / "sub-02.html",
                            args.screenshots / "report_participant.png", width=1200, height=1900),
                 screenshot(result.html, args.screenshots / "report_group.png", width=1200,
                            height=1500)]
        for shot in shots:  # 256 colours: a third of the size, same look, kinder to git
            with Image.open(shot) as img:
                img.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
                    shot, optimize=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

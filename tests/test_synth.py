"""Tests of the phantom generator (bids_cl.synth, bids_cl-synth). All on the ``tiny`` size."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_cl.synth import (
    CL_TYPES,
    LESION_TYPES,
    SynthError,
    SynthOptions,
    anatomy,
    bids_io,
    contrast,
    generate_dataset,
    geometry,
    lesions,
    plan_participants,
    quality,
    simulate_subject,
    write_dataset,
    write_subject,
)
from bids_cl.synth.anatomy import CSF, GM, VENTRICLE, WM
from bids_cl.synth.cli import main as synth_main

# ----------------------------------------------------------------------------------------------
# helpers


def crop(ph, lesion_id: int, pad: int = 4) -> tuple[slice, ...]:
    """Bounding box of a lesion grown by ``pad`` voxels (keeps the per-lesion checks cheap)."""
    return quality.lesion_box(ph.truth.dseg, lesion_id, pad)


def lesion_contrast(image: np.ndarray, ph, lesion_id: int) -> float:
    return quality.lesion_contrast(image, ph.truth.dseg, ph.labels, lesion_id, ph.truth.fraction)


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------
# fixtures: one small longitudinal dataset (3 T + 7 T, MP2RAGE + MPRAGE), kept in memory too


MAIN = dict(participants=2, sessions=2, seed=7, field="mixed", sequence="both", size="tiny",
            dtype="int16", lesion_free_fraction=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "bids"
    subjects = []
    write_dataset(root, SynthOptions(**MAIN), on_subject=subjects.append)
    return root, subjects


@pytest.fixture(scope="module")
def images(dataset):
    return [img for subject in dataset[1] for img in subject.images]


# ----------------------------------------------------------------------------------------------
# pure numerics


def test_mp2rage_contrast_order_and_uni_range():
    s1, s2 = contrast.mp2rage_signals(np.array([850.0, 1350.0, 4000.0]), 1.0, contrast.MP2RAGE[3.0])
    uni = contrast.uni_combination(s1.astype(complex), s2.astype(complex))
    assert uni[0] > uni[1] > uni[2]  # WM brighter than GM brighter than CSF
    assert np.all(np.abs(uni) <= 0.5)
    # longer T1 -> darker UNI: the reason lesions are hypointense
    t1 = np.linspace(600, 3000, 50)
    s1_7t, s2_7t = contrast.mp2rage_signals(t1, 1.0, contrast.MP2RAGE[7.0])
    u = contrast.uni_combination(s1_7t.astype(complex), s2_7t.astype(complex))
    assert np.all(np.diff(u) < 0)
    # the first inversion is signed: CSF is still negative at TI1
    assert s1[2] < 0 < s2[2]


def test_uni_of_pure_noise_is_salt_and_pepper():
    rng = np.random.default_rng(0)
    zero = np.zeros(20000)
    re1, im1 = contrast.add_noise(rng, zero, 1.0)
    re2, im2 = contrast.add_noise(rng, zero, 1.0)
    uni = contrast.uni_from_parts(re1, im1, re2, im2)
    # spread over the whole range, not a dark background
    assert uni.min() < -0.45 and uni.max() > 0.45 and 0.2 < uni.std() < 0.4


def test_synthesize_matches_tables():
    tables = contrast.signal_tables(3.0, "mp2rage")
    fractions = np.eye(len(contrast.CLASSES), dtype=np.float32)[:, :, None]  # one pure voxel each
    for b1 in (0.6, 1.0, 1.3):
        out = contrast.synthesize(fractions, np.full((len(contrast.CLASSES), 1), b1, np.float32), tables)
        expected = np.array([[np.interp(b1, contrast.B1_GRID, tables[k, c]) for c in range(tables.shape[1])]
                             for k in range(2)])
        np.testing.assert_allclose(out[:, :, 0], expected, atol=2e-3 * np.abs(tables).max())


def test_lesion_contrast_measure():
    labels = np.full((12, 12, 12), WM, np.uint8)
    labels[:, :, 6:] = GM
    image = np.where(labels == WM, 100.0, 60.0)
    dseg = np.zeros(labels.shape, np.int16)
    dseg[4:8, 4:8, 4:8] = 1  # half in WM, half in GM
    image[(dseg == 1) & (labels == WM)] = 80.0  # -20% in WM
    image[(dseg == 1) & (labels == GM)] = 45.0  # -25% in GM
    assert quality.lesion_contrast(image, dseg, labels, 1) == pytest.approx(-0.225)


def test_soft_blobs_edge():
    blob = lesions.Blob(np.zeros(3), np.array([4.0, 2.0, 3.0]), np.eye(3))
    pts = np.array([[0, 0, 0], [4.0, 0, 0], [0, 2.0, 0], [8.0, 0, 0]])
    v = lesions.soft_blobs(pts, [blob], edge_mm=1.0)
    assert v[0] > 0.99 and abs(v[1] - 0.5) < 1e-6 and abs(v[2] - 0.5) < 1e-6 and v[3] < 0.01


def test_allowed_tissue_rules():
    labels = np.array([CSF, GM, WM, 0], np.uint8)
    code = lesions.TYPE_CODES
    for name, ok in {"intracortical": [0, 1, 0, 0], "leukocortical": [0, 1, 1, 0],
                     "juxtacortical": [0, 0, 1, 0], "periventricular": [0, 0, 1, 0],
                     "deep_wm": [0, 0, 1, 0]}.items():
        got = lesions.allowed_tissue(np.full(4, code[name], np.uint8), labels)
        assert got.tolist() == [bool(x) for x in ok], name


def test_lesion_status_over_sessions():
    blob = lesions.Blob(np.zeros(3), np.ones(3), np.eye(3))
    les = lesions.Lesion(1, "leukocortical", (blob,), onset=1, enlarge_at=3, growth=1.3)
    assert [les.status_at(s) for s in (1, 2, 3, 4)] == ["baseline", "stable", "enlarging", "stable"]
    new = lesions.Lesion(2, "deep_wm", (blob,), onset=2)
    assert new.scale_at(1) is None and new.status_at(2) == "new"
    assert LESION_TYPES["juxtacortical"] == "CL" and LESION_TYPES["periventricular"] == "WML"
    shrinking = lesions.Lesion(3, "intracortical", (blob,), shrink_at=2, shrink=0.8)
    assert [shrinking.status_at(s) for s in (1, 2, 3)] == ["baseline", "shrinking", "stable"]
    assert [shrinking.scale_at(s) for s in (1, 2, 3)] == [1.0, 0.8, 0.8]
    assert shrinking.sizes == (0.8, 1.0)
    gone = lesions.Lesion(4, "juxtacortical", (blob,), onset=2, disappear_at=3)
    assert [gone.status_at(s) for s in (1, 2, 3, 4)] == [None, "new", "disappeared", None]
    assert [gone.scale_at(s) for s in (1, 2, 3, 4)] == [None, 1.0, None, None]
    assert [gone.present_at(s) for s in (1, 2, 3, 4)] == [False, True, False, False]


def test_course_events_and_their_sessions():
    """Each lesion with later sessions has at most one event; its session is a later one; every
    event happens, at the configured rates (plan only: no drawing)."""
    from bids_cl.synth.generate import _LESIONS, P_DISAPPEAR, P_ENLARGE, P_SHRINK, _rng, lesion_plan

    counts = {"enlarge": 0, "shrink": 0, "disappear": 0, "none": 0}
    for seed in range(60):
        options = SynthOptions(participants=1, sessions=3, seed=seed, lesion_free_fraction=0.0)
        person = plan_participants(options)[0]
        for entry in lesion_plan(_rng(seed, 0, _LESIONS), person, 3, "tiny"):
            events = {k: v for k, v in (("enlarge", entry.enlarge_at), ("shrink", entry.shrink_at),
                                        ("disappear", entry.disappear_at)) if v is not None}
            assert len(events) <= 1
            if entry.onset == 3:
                assert not events  # no later session: no event
                continue
            for at in events.values():
                assert entry.onset < at <= 3
            counts[next(iter(events), "none")] += 1
    total = sum(counts.values())
    for key, p in (("enlarge", P_ENLARGE), ("shrink", P_SHRINK), ("disappear", P_DISAPPEAR)):
        assert abs(counts[key] / total - p) < 0.06, (key, counts)


def test_one_session_datasets_draw_what_they_drew_before():
    """The course draws nothing without later sessions, so 1-session phantoms (the demo model's
    training and evaluation sets, the README demo) keep their lesions: the truth table of the
    README demo's sub-01 (seed 2026), as the generator wrote it before shrinking and disappearing
    lesions existed."""
    options = SynthOptions(participants=2, sessions=1, seed=2026, sequence="both", field="mixed")
    subject = simulate_subject(options, plan_participants(options)[0])
    (ph,) = [img for img in subject.images if img.sequence == "mp2rage"]
    got = [(r["lesion_id"], r["type"], r["label"], f"{r['volume_ul']:.3f}",
            *(f"{r[c]:.3f}" for c in ("centroid_x", "centroid_y", "centroid_z")), r["status"])
           for r in ph.rows]
    assert got == [
        (1, "leukocortical", "CL", "312.000", "-35.205", "-26.846", "67.359", "baseline"),
        (2, "intracortical", "CL", "312.000", "7.359", "-14.179", "-5.256", "baseline"),
        (3, "deep_wm", "WML", "56.000", "28.143", "-16.143", "38.714", "baseline"),
        (4, "deep_wm", "WML", "208.000", "-26.846", "-45.923", "23.077", "baseline"),
        (5, "deep_wm", "WML", "416.000", "33.346", "-10.115", "19.615", "baseline"),
        (6, "periventricular", "WML", "472.000", "9.576", "17.508", "-0.831", "baseline"),
    ]


def test_shrinking_and_disappearing_lesions_in_the_truth(tmp_path):
    """Three sessions of one participant (seed 3 plans a shrink at ses-02 and ses-03, a
    disappearance at ses-02, enlargements and new lesions): shrinking lesions are smaller than at
    the previous session and stay in the image; a disappeared lesion keeps its id, has a row of
    volume 0 without centroid at the session it vanished, is in no later table and in neither the
    dseg nor the masks; the written table says the same."""
    options = SynthOptions(participants=1, sessions=3, seed=3, lesion_free_fraction=0.0)
    subject = simulate_subject(options, plan_participants(options)[0])
    rows = {ph.session: {r["lesion_id"]: r for r in ph.rows} for ph in subject.images}
    by_session = {ph.session: ph for ph in subject.images}
    seen = set()
    for ses in (2, 3):
        before, now = rows[ses - 1], rows[ses]
        for lesion_id, row in now.items():
            seen.add(row["status"])
            if row["status"] == "shrinking":
                assert 0 < row["volume_ul"] < before[lesion_id]["volume_ul"]
                assert (by_session[ses].truth.dseg == lesion_id).sum() >= 5
            if row["status"] == "disappeared":
                assert lesion_id in before and before[lesion_id]["volume_ul"] > 0
                assert row["volume_ul"] == 0 and row["centroid_x"] is None
                assert not (by_session[ses].truth.dseg == lesion_id).any()
                assert all(lesion_id not in rows[later] for later in range(ses + 1, 4))
    assert {"new", "enlarging", "stable", "shrinking", "disappeared"} <= seen
    write_subject(tmp_path, subject, options)
    table = read_tsv(tmp_path / "derivatives/manual_masks/sub-01/ses-02/anat/"
                     "sub-01_ses-02_desc-lesions_stats.tsv")
    gone = [r for r in table if r["status"] == "disappeared"]
    assert gone and all(r["volume_ul"] == "0.000" and r["centroid_x"] == "n/a" for r in gone)
    assert [int(r["lesion_id"]) for r in table] == sorted(int(r["lesion_id"]) for r in table)


@pytest.mark.parametrize("orientation, codes", [("RAS", ("R", "A", "S")), ("LPS", ("L", "P", "S")),
                                                 ("LAS", ("L", "A", "S"))])
def test_grid_affine_orientations(orientation, codes):
    affine, shape = geometry.grid_affine(orientation, (1.0, 1.0, 1.2))
    assert nib.aff2axcodes(affine) == codes
    last = np.array(shape) - 1
    corners = np.array([[i, j, k] for i in (0, last[0]) for j in (0, last[1]) for k in (0, last[2])])
    world = geometry.voxel_centroid_world(affine, corners)
    # the grid covers the field of view (to within a voxel)
    assert np.all(world.min(axis=0) <= geometry.FOV_MIN + 1.2)
    assert np.all(world.max(axis=0) >= geometry.FOV_MAX - 1.2)


def test_grid_affine_oblique_is_rotated():
    affine, _ = geometry.grid_affine("oblique", (2, 2, 2), (15.0, 3.0, -5.0))
    direction = affine[:3, :3] / 2.0
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    assert np.abs(direction - np.diag(np.diag(direction))).max() > 0.1


def test_upsample_linear_is_exact_on_linear_fields():
    axes = [np.linspace(0, n - 1, m) for n, m in ((30, 4), (20, 5), (25, 3))]
    grid = np.meshgrid(*axes, indexing="ij")
    coarse = 2 * grid[0] - grid[1] + 0.5 * grid[2]
    fine = geometry.upsample_linear(coarse, (30, 20, 25))
    i, j, k = np.indices((30, 20, 25))
    np.testing.assert_allclose(fine, 2 * i - j + 0.5 * k, atol=1e-4)


def test_int16_images_carry_a_slope(tmp_path):
    phys = np.linspace(0, 4095, 24, dtype=np.float32).reshape(2, 3, 4)
    path = tmp_path / "x.nii.gz"
    bids_io.write_image(path, phys, np.diag([1.0, 1.0, 1.2, 1.0]), "int16")
    img = nib.load(path)
    assert img.get_data_dtype() == np.int16
    assert img.dataobj.slope == pytest.approx(bids_io.INT16_SLOPE) and img.dataobj.slope != 1
    np.testing.assert_allclose(img.get_fdata(), phys, atol=bids_io.INT16_SLOPE / 2 + 1e-6)
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


def test_names_and_prefixes():
    n = bids_io.mp2rage_names("01", "02", both=True, uni_as_t1w=False)
    assert n["uni"] == "sub-01_ses-02_acq-mp2rage_UNIT1"
    assert n["inv1"] == "sub-01_ses-02_acq-mp2rage_inv-1_part-mag_MP2RAGE"
    assert n["prefix"] == "sub-01_ses-02_acq-mp2rage"
    n = bids_io.mp2rage_names("01", None, both=False, uni_as_t1w=True)
    assert n["uni"] == "sub-01_acq-UNI_T1w" and n["prefix"] == "sub-01_acq-UNI"
    assert n["inv2"] == "sub-01_inv-2_part-mag_MP2RAGE"
    assert bids_io.mprage_names("03", "01", both=True) == {"t1w": "sub-03_ses-01_acq-mprage_T1w",
                                                          "prefix": "sub-03_ses-01_acq-mprage"}


def test_participant_plan():
    people = plan_participants(SynthOptions(participants=10, lesion_free_fraction=0.3, field="mixed"))
    assert [p.label for p in people][:2] == ["01", "02"]
    assert sum(p.lesion_free for p in people) == 3
    assert all(p.diagnosis == "HC" for p in people if p.lesion_free)
    assert {p.diagnosis for p in people if not p.lesion_free} <= {"RRMS", "SPMS", "PPMS", "CIS"}
    assert {p.field_t for p in people} == {3.0, 7.0}
    rng = np.random.default_rng(0)
    from bids_cl.synth.generate import lesion_plan

    assert all(lesion_plan(rng, p, 2, "tiny") == [] for p in people if p.lesion_free)


def test_bad_options_are_usage_errors():
    for bad in (dict(participants=0), dict(field="1.5T"), dict(sessions=2, use_sessions=False),
                dict(voxel_size=(1, 1)), dict(lesion_free_fraction=2.0)):
        with pytest.raises(SynthError) as err:
            SynthOptions(**bad)
        assert err.value.code == 64


def test_missing_colin27_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(anatomy.CH2_DIR_ENV, str(tmp_path))
    with pytest.raises(SynthError) as err:
        anatomy.ch2_paths()
    message = str(err.value)
    assert "mricron-data" in message and "\n" not in message and err.value.code == 66


# ----------------------------------------------------------------------------------------------
# phantoms (in memory)


def test_lesions_sit_in_their_tissue(images):
    n_checked = {t: 0 for t in LESION_TYPES}
    for ph in images:
        for row in ph.present_rows:
            box = crop(ph, row["lesion_id"])
            labels, regions = ph.labels[box], ph.regions[box]
            own = ph.truth.dseg[box] == row["lesion_id"]
            tissue = labels[own]
            near = ndi.binary_dilation(own, structure=np.ones((3, 3, 3))) & ~own
            kind = row["type"]
            if kind == "intracortical":
                assert np.all(tissue == GM)
            elif kind == "leukocortical":
                assert np.any(tissue == GM) and np.any(tissue == WM) and np.all(np.isin(tissue, (GM, WM)))
            else:
                assert np.all(tissue == WM), kind
            if kind == "juxtacortical":
                assert np.any(labels[near] == GM)
            if kind == "periventricular":
                assert np.any(regions[near] & VENTRICLE)
            if kind == "deep_wm":
                assert not np.any(labels[near] == GM) and not np.any(regions[near] & VENTRICLE)
            assert row["label"] == LESION_TYPES[kind]
            n_checked[kind] += 1
    assert sum(n_checked[t] for t in CL_TYPES) >= 5 and sum(n_checked.values()) >= 10


def test_lesions_are_hypointense(images):
    figures = {"mp2rage": [], "mprage": []}
    for ph in images:
        for row in ph.present_rows:
            figures[ph.sequence].append(lesion_contrast(ph.target_image, ph, row["lesion_id"]))
    uni, t1w = np.array(figures["mp2rage"]), np.array(figures["mprage"])
    assert len(uni) and len(t1w) and not np.isnan(uni).any() and not np.isnan(t1w).any()
    # every labelled lesion is clearly darker than the same tissue around it
    assert uni.max() < -0.15 and np.median(uni) < -0.25
    assert t1w.max() < -0.08 and np.median(t1w) < -0.12


def test_inv2_is_not_darker_in_lesions(images):
    # INV2 is nearly proton-density weighted: lesions (more free water) are iso- to hyperintense
    for ph in images:
        inv2 = [v for k, v in ph.images.items() if "inv-2" in k]
        if not inv2 or not ph.present_rows:
            continue
        values = [lesion_contrast(inv2[0], ph, r["lesion_id"]) for r in ph.present_rows]
        assert np.nanmedian(values) > -0.05


def test_truth_is_consistent(images):
    for ph in images:
        cl, wml = ph.cl_mask, ph.wml_mask
        assert not np.any(cl & wml)
        assert np.array_equal(cl | wml, ph.truth.dseg > 0)
        assert np.all(ph.brain_mask[ph.truth.dseg > 0])
        # every lesion is one 26-connected component, and no two lesions touch
        comps, n = ndi.label(ph.truth.dseg > 0, structure=np.ones((3, 3, 3)))
        assert n == len(ph.present_rows)
        voxel_ul = abs(np.linalg.det(ph.affine[:3, :3]))
        for row in ph.present_rows:
            own = ph.truth.dseg == row["lesion_id"]
            assert len(np.unique(comps[own])) == 1
            assert row["volume_ul"] == pytest.approx(own.sum() * voxel_ul)


def test_longitudinal_truth(dataset):
    for subject in dataset[1]:
        by_session = {}
        for ph in subject.images:
            by_session.setdefault((ph.sequence, ph.session), {r["lesion_id"]: r for r in ph.rows})
        for (seq, ses), rows in by_session.items():
            if ses == 1:
                assert all(r["status"] == "baseline" for r in rows.values())
                continue
            before = by_session[(seq, ses - 1)]
            for lesion_id, row in rows.items():
                assert row["status"] in {"new", "enlarging", "stable", "shrinking", "disappeared"}
                if row["status"] == "new":
                    assert lesion_id not in before
                if row["status"] == "enlarging" and lesion_id in before:
                    assert row["volume_ul"] > before[lesion_id]["volume_ul"]
                if row["status"] == "shrinking" and lesion_id in before:
                    assert row["volume_ul"] < before[lesion_id]["volume_ul"]
    statuses = {r["status"] for s in dataset[1] for ph in s.images for r in ph.rows}
    assert "new" in statuses


def test_lesion_free_participant():
    options = SynthOptions(participants=1, lesion_free_fraction=1.0, seed=3)
    person = plan_participants(options)[0]
    subject = simulate_subject(options, person)
    (ph,) = subject.images
    assert person.diagnosis == "HC" and subject.lesions == [] and ph.rows == []
    assert not ph.truth.dseg.any() and ph.brain_mask.sum() > 1000


def test_masks_align_in_world_space_under_every_orientation():
    """Same seed, other grids: lesions and brain sit at the same scanner coordinates."""
    centroids, brains = {}, {}
    knobs = [("RAS", None), ("LPS", None), ("LAS", None), ("oblique", None), ("RAS", (1.6, 2.0, 2.4))]
    for orientation, voxel_size in knobs:
        options = SynthOptions(participants=1, seed=11, orientation=orientation, voxel_size=voxel_size,
                               lesion_free_fraction=0.0)
        (ph,) = simulate_subject(options, plan_participants(options)[0]).images
        assert ph.orientation == orientation
        centroids[(orientation, voxel_size)] = {
            r["lesion_id"]: np.array([r["centroid_x"], r["centroid_y"], r["centroid_z"]]) for r in ph.rows
        }
        ijk = np.argwhere(ph.brain_mask).mean(axis=0, keepdims=True)
        brains[(orientation, voxel_size)] = geometry.voxel_centroid_world(ph.affine, ijk)[0]
        # the image agrees with its own masks: lesions dark, brain where the signal is
        assert all(lesion_contrast(ph.target_image, ph, r["lesion_id"]) < -0.1 for r in ph.rows)
    ref = centroids[("RAS", None)]
    assert len(ref) >= 3
    for key, cents in centroids.items():
        common = set(ref) & set(cents)
        assert len(common) >= len(ref) - 1, key
        worst = max(np.linalg.norm(cents[i] - ref[i]) for i in common)
        assert worst < 1.5, (key, worst)  # mm, below the 2 mm voxel
        assert np.linalg.norm(brains[key] - brains[("RAS", None)]) < 1.0, key


# ----------------------------------------------------------------------------------------------
# files


def test_dataset_layout_and_metadata(dataset):
    root, subjects = dataset
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "raw" and desc["GeneratedBy"][0]["Name"] == "bids_cl-synth"
    truth = root / "derivatives" / "manual_masks"
    tdesc = json.loads((truth / "dataset_description.json").read_text())
    assert tdesc["DatasetType"] == "derivative" and tdesc["GeneratedBy"]
    people = read_tsv(root / "participants.tsv")
    assert list(people[0]) == ["participant_id", "age", "sex", "site", "diagnosis"]
    assert [p["participant_id"] for p in people] == ["sub-01", "sub-02"]
    assert (root / "participants.json").is_file() and (root / "README").is_file()
    anat1 = root / "sub-01" / "ses-02" / "anat"
    names = sorted(p.name for p in anat1.glob("*.nii.gz"))
    assert names == ["sub-01_ses-02_acq-mp2rage_UNIT1.nii.gz",
                     "sub-01_ses-02_acq-mp2rage_inv-1_part-mag_MP2RAGE.nii.gz",
                     "sub-01_ses-02_acq-mp2rage_inv-2_part-mag_MP2RAGE.nii.gz",
                     "sub-01_ses-02_acq-mprage_T1w.nii.gz"]
    fields = {json.loads((anat1 / n.replace(".nii.gz", ".json")).read_text())["MagneticFieldStrength"]
              for n in names}
    assert fields == {3}
    inv1 = json.loads((anat1 / "sub-01_ses-02_acq-mp2rage_inv-1_part-mag_MP2RAGE.json").read_text())
    inv2 = json.loads((anat1 / "sub-01_ses-02_acq-mp2rage_inv-2_part-mag_MP2RAGE.json").read_text())
    for key in ("MagneticFieldStrength", "InversionTime", "RepetitionTimePreparation", "FlipAngle",
                "PulseSequenceType", "SeriesDescription", "Manufacturer", "NumberShots",
                "RepetitionTimeExcitation"):
        assert key in inv1 and key in inv2
    assert inv1["InversionTime"] < inv2["InversionTime"] and inv1["PulseSequenceType"] == "MP2RAGE"
    t1w = json.loads((anat1 / "sub-01_ses-02_acq-mprage_T1w.json").read_text())
    assert t1w["PulseSequenceType"] == "MPRAGE" and "InversionTime" in t1w
    seven = json.loads(next((root / "sub-02" / "ses-01" / "anat").glob("*UNIT1.json")).read_text())
    assert seven["MagneticFieldStrength"] == 7


def test_truth_files_match_images(dataset):
    root, subjects = dataset
    truth = root / "derivatives" / "manual_masks"
    for subject in subjects:
        for ph in subject.images:
            ses = f"ses-{ph.session_label}"
            raw = nib.load(root / f"sub-{subject.participant.label}" / ses / "anat" / f"{ph.target}.nii.gz")
            assert raw.get_data_dtype() == np.int16 and raw.dataobj.slope != 1
            folder = truth / f"sub-{subject.participant.label}" / ses / "anat"
            loaded = {}
            for suffix in ("label-CL_mask", "label-WML_mask", "desc-brain_mask", "desc-lesions_dseg"):
                img = nib.load(folder / f"{ph.prefix}_{suffix}.nii.gz")
                assert img.shape == raw.shape
                np.testing.assert_allclose(img.affine, raw.affine, atol=1e-5)
                loaded[suffix] = np.asarray(img.dataobj)
            assert np.array_equal(loaded["label-CL_mask"] > 0, ph.cl_mask)
            assert np.array_equal(loaded["desc-lesions_dseg"], ph.truth.dseg)
            assert not np.any((loaded["label-CL_mask"] > 0) & (loaded["label-WML_mask"] > 0))
            rows = read_tsv(folder / f"{ph.prefix}_desc-lesions_stats.tsv")
            assert len(rows) == len(ph.rows)
            for row in rows:
                own = loaded["desc-lesions_dseg"] == int(row["lesion_id"])
                if row["status"] == "disappeared":  # no voxel, no centroid
                    assert not own.any() and row["centroid_x"] == "n/a"
                    continue
                mean_ijk = np.argwhere(own).mean(axis=0, keepdims=True)
                centre = geometry.voxel_centroid_world(raw.affine, mean_ijk)[0]
                got = np.array([float(row[k]) for k in ("centroid_x", "centroid_y", "centroid_z")])
                np.testing.assert_allclose(got, centre, atol=0.01)
                assert row["label"] == ("CL" if row["type"] in CL_TYPES else "WML")
                assert (loaded["label-CL_mask"][own] > 0).all() == (row["label"] == "CL")
            # the raw image holds the simulated values (int16 x scl_slope)
            np.testing.assert_allclose(raw.get_fdata(), ph.target_image, atol=bids_io.INT16_SLOPE)


def _validator() -> list[str] | None:
    here = Path(sys.executable).parent
    for name in ("bids-validator-deno", "bids-validator"):
        exe = shutil.which(name) or (str(here / name) if (here / name).is_file() else None)
        if exe:
            return [exe]
    return None


def test_bids_validator(dataset):
    command = _validator()
    if command is None:
        pytest.skip("no bids-validator-deno / bids-validator on PATH")
    proc = subprocess.run([*command, "--json", str(dataset[0])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "NO_COLOR": "1"})
    try:
        report = json.loads(proc.stdout)
        errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    except (json.JSONDecodeError, KeyError):  # legacy validator: rely on the exit code
        errors = [proc.stdout[-2000:]] if proc.returncode else []
    assert not errors, errors[:3]


def test_same_seed_same_bytes(tmp_path):
    knobs = dict(participants=1, seed=5, field="7T", orientation="oblique", dtype="int16",
                 uni_as_t1w=True, lesion_free_fraction=0.0, use_sessions=False)
    a = generate_dataset(tmp_path / "a", **knobs)
    b = generate_dataset(tmp_path / "b", **knobs)
    digest = tree_digest(a)
    assert digest == tree_digest(b)
    assert "sub-01/anat/sub-01_acq-UNI_T1w.nii.gz" in digest
    assert "derivatives/manual_masks/sub-01/anat/sub-01_acq-UNI_label-CL_mask.nii.gz" in digest
    with open(a / "sub-01/anat/sub-01_acq-UNI_T1w.nii.gz", "rb") as fh:
        assert fh.read(10)[4:8] == b"\0\0\0\0"  # gzip mtime 0
    c = generate_dataset(tmp_path / "c", **{**knobs, "seed": 6})
    assert tree_digest(c) != digest


def test_cli(tmp_path, capsys):
    out = tmp_path / "ds"
    assert synth_main([str(out), "--participants", "1", "--seed", "2", "--sequence", "mprage",
                       "--orientation", "LPS", "--voxel-size", "2,2,2.4", "--dtype", "float32", "-q"]) == 0
    t1w = nib.load(out / "sub-01" / "ses-01" / "anat" / "sub-01_ses-01_T1w.nii.gz")
    assert nib.aff2axcodes(t1w.affine) == ("L", "P", "S") and t1w.get_data_dtype() == np.float32
    np.testing.assert_allclose(t1w.header.get_zooms(), (2, 2, 2.4))
    truth = out / "derivatives/manual_masks/sub-01/ses-01/anat"
    assert (truth / "sub-01_ses-01_desc-lesions_stats.tsv").is_file()
    # a non-empty output folder is refused with the BIDS-App code for "cannot create output"
    assert synth_main([str(out), "--participants", "1"]) == 73
    assert "bids_cl-synth: error:" in capsys.readouterr().err
    assert synth_main([str(tmp_path / "x"), "--field", "9T"]) == 64
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # one line, no usage block

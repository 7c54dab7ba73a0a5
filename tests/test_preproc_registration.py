"""Registration: transforms, resampling and point mapping (Colin27 -> MNI152NLin2009aSym, sloppy: 4 mm,
seconds), and accuracy on a phantom warped by a known field (tiny grid, default and reference schedules)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.preproc import (
    apply_to_template,
    get_template,
    points_to_template,
    register_to_template,
)
from bids_cl.preproc._images import downsample, from_ants, to_ants

MRICRON = Path("/usr/share/mricron/templates")
# Colin27 tests need Debian mricron-data; the known-warp tests build their own phantom.
needs_mricron = pytest.mark.skipif(not (MRICRON / "ch2bet.nii.gz").is_file(),
                                   reason="needs Debian mricron-data (apt-get install mricron-data)")


def _subject_brain() -> nib.Nifti1Image:
    """Colin27's brain at 2 mm, stored LPS-ish (x flipped) and moved by 12 degrees and 20 mm, so that
    a sign error between RAS and LPS or a forward/inverse mix-up shows up as tens of millimetres."""
    img = downsample(nib.load(str(MRICRON / "ch2bet.nii.gz")), 2.0)
    data = np.asanyarray(img.dataobj).astype(np.float32)[::-1]  # flip the first voxel axis ...
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, data.shape[0] - 1
    affine = img.affine @ flip  # ... and its affine: same anatomy, other storage order
    angle = np.deg2rad(12.0)
    rigid = np.eye(4)
    rigid[0:2, 0:2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rigid[:3, 3] = [12.0, -10.0, 12.0]
    return nib.Nifti1Image(data, rigid @ affine)


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("TEMPLATEFLOW_HOME", str(tmp_path_factory.mktemp("tf")))
    yield get_template("MNI152NLin2009aSym", resolution=2)
    mp.undo()


@pytest.fixture(scope="module")
def registered(template, tmp_path_factory):
    brain = _subject_brain()
    out = tmp_path_factory.mktemp("reg")
    return brain, register_to_template(brain, template, out_prefix=out / "sub-01_", sloppy=True,
                                       seed=7, nthreads=1)


def _blob(img: nib.Nifti1Image, offset_vox: tuple[int, int, int], radius: int = 3) -> nib.Nifti1Image:
    ii, jj, kk = np.indices(img.shape)
    center = np.array(img.shape) // 2 + np.array(offset_vox)
    ball = ((ii - center[0]) ** 2 + (jj - center[1]) ** 2 + (kk - center[2]) ** 2) <= radius**2
    return nib.Nifti1Image(ball.astype(np.uint8), img.affine)


def _centroid_mm(img: nib.Nifti1Image) -> np.ndarray:
    w = img.get_fdata()
    idx = np.argwhere(w > 0)
    return nib.affines.apply_affine(img.affine, (idx * w[w > 0][:, None]).sum(0) / w.sum())


@needs_mricron
def test_registration_outputs(registered, template):
    _, res = registered
    for path in (res.composite_h5, res.inverse_composite_h5, res.warped_moving):
        assert Path(path).is_file() and Path(path).stat().st_size > 0
    assert res.composite_h5.endswith("sub-01_Composite.h5") and res.forward_transforms == [res.composite_h5]
    warped = nib.load(res.warped_moving)
    assert warped.shape == nib.load(template.t1w).shape
    m = res.metrics
    assert m["ncc_after"] > m["ncc_before"] + 0.2  # the subject starts rotated and shifted
    assert m["mask_dice"] > 0.9 and m["seed"] == 7 and m["itk_threads"] == 1 and m["sloppy"]


@needs_mricron
def test_centroid_maps_to_warped_blob_centroid(registered, template):
    """points_to_template (inverse transforms, LPS<->RAS) agrees with warping the image (forward)."""
    brain, res = registered
    for offset in ((8, 4, 6), (-10, -6, 2)):
        blob = _blob(brain, offset)
        mapped = points_to_template(_centroid_mm(blob)[None], res)[0]
        warped = apply_to_template(blob, res, template, interpolation="linear")
        assert np.linalg.norm(mapped - _centroid_mm(warped)) < 2.0  # one template voxel (2 mm)


@needs_mricron
def test_apply_to_template_keeps_label_dtype(registered, template):
    brain, res = registered
    blob = _blob(brain, (0, 0, 0), radius=4)
    nn = apply_to_template(blob, res, template)  # nearestNeighbor by default: masks stay masks
    assert nn.get_data_dtype() == np.uint8 and set(np.unique(nn.get_fdata())) == {0, 1}
    tpl_img = nib.load(template.t1w)
    assert nn.shape == tpl_img.shape and np.allclose(nn.affine, tpl_img.affine)
    lin = apply_to_template(blob, res, template.t1w, interpolation="linear")
    assert lin.get_data_dtype() == np.float32
    with pytest.raises(ValueError):
        apply_to_template(blob, res, template, interpolation="cubic")


@needs_mricron
def test_points_edge_cases(registered):
    _, res = registered
    assert points_to_template(np.zeros((0, 3)), res).shape == (0, 3)
    assert points_to_template([1.0, 2.0, 3.0], res).shape == (1, 3)


@needs_mricron
def test_same_seed_same_result(registered, template, tmp_path):
    """One ITK thread + fixed seed: a rerun is bit-identical (the transform and the warped image)."""
    brain, first = registered
    again = register_to_template(brain, template, out_prefix=tmp_path / "again_", sloppy=True, seed=7)
    a, b = nib.load(first.warped_moving).get_fdata(), nib.load(again.warped_moving).get_fdata()
    assert np.array_equal(a, b)
    p = np.array([[10.0, -20.0, 15.0]])
    assert np.array_equal(points_to_template(p, first), points_to_template(p, again))


def test_nibabel_ants_round_trip():
    """Our RAS<->LPS conversion keeps the voxel-to-world mapping of oblique, flipped images exactly."""
    angle = np.deg2rad(17.0)
    affine = np.array([[-0.9 * np.cos(angle), 0, 1.2 * np.sin(angle), 80.0],
                       [0, 1.1, 0, -120.0],
                       [0.9 * np.sin(angle), 0, 1.2 * np.cos(angle), -60.0],
                       [0, 0, 0, 1]])
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    aimg = to_ants(nib.Nifti1Image(data, affine))
    back = from_ants(aimg)
    assert np.allclose(back.affine, affine, atol=1e-5) and np.array_equal(back.get_fdata(), data)
    # ITK's physical point of voxel (1, 2, 3) is the LPS version of nibabel's RAS point
    ras = nib.affines.apply_affine(affine, [1, 2, 3])
    lps = aimg.origin + (np.asarray(aimg.direction) * aimg.spacing) @ [1, 2, 3]
    assert np.allclose(lps, ras * [-1, -1, 1], atol=1e-5)


# --- accuracy where the truth is known (issue 20): a phantom warped by a known smooth field + rigid motion


@pytest.fixture(scope="module")
def known_case():
    """The tiny (2 mm) bids_cl-synth phantom at 4 mm, and a subject made from it by a known warp."""
    from bids_cl.preproc.known_warp import make_case
    from bids_cl.synth import SynthOptions, plan_participants, simulate_subject

    options = SynthOptions(participants=1, seed=3, sequence="mprage", size="tiny")
    ph = simulate_subject(options, plan_participants(options)[0]).images[0]

    def at4(data, order):
        return np.asanyarray(downsample(nib.Nifti1Image(data, ph.affine), 4.0, order=order).dataobj)

    grid = downsample(nib.Nifti1Image(ph.brain_mask.astype(np.float32), ph.affine), 4.0, order=0)
    return make_case(at4(ph.target_image.astype(np.float32), 1), at4(ph.brain_mask.astype(np.uint8), 0),
                     at4(ph.labels, 0), at4(ph.truth.dseg.astype(np.int16), 0), grid.affine, seed=1)


def test_known_warp_construction(known_case):
    """The subject really is the template seen through ``warp``: the true map puts each subject lesion's
    centroid within one 4 mm voxel of its template lesion's centroid, and the subject's tissue labels
    pulled back through the true map overlap the template's; without it they do not."""
    from bids_cl.preproc.known_warp import label_centroids, make_known_warp

    c = known_case
    subj, tpl = label_centroids(c.subject_lesions, c.subject.affine), label_centroids(c.template_lesions,
                                                                                       c.template.affine)
    ids = sorted(set(subj) & set(tpl))
    assert len(ids) >= 3
    true = np.linalg.norm(c.warp(np.stack([subj[i] for i in ids])) - np.stack([tpl[i] for i in ids]), axis=1)
    naive = np.linalg.norm(np.stack([subj[i] for i in ids]) - np.stack([tpl[i] for i in ids]), axis=1)
    assert np.median(true) < 2.0 and np.median(naive) > 8.0  # the rigid motion alone moves ~10 mm
    assert c.warp.max_gradient() < 0.5
    with pytest.raises(ValueError):
        make_known_warp(np.zeros(3), amplitude_mm=10.0, wavelength_mm=40.0)  # would fold


@pytest.fixture(scope="module")
def known_scores(known_case, tmp_path_factory):
    from bids_cl.preproc.known_warp import score_registration

    out, scores = tmp_path_factory.mktemp("known"), {}
    for schedule in ("fast", "reference"):
        res = register_to_template(known_case.subject, known_case.template,
                                   template_mask=known_case.template_mask, out_prefix=out / f"{schedule}_",
                                   schedule=schedule, seed=42)
        scores[schedule] = (res, score_registration(known_case, res, points=1000))
    return scores


def test_default_schedule_accuracy_on_known_warp(known_scores):
    """The default (``fast``) schedule recovers the known warp: points inside the brain land within
    about a voxel of their true template position, lesion centroids too, and tissue maps overlap."""
    res, s = known_scores["fast"]
    assert res.metrics["schedule"] == "fast" and not res.metrics["sloppy"]
    assert s["points_mm"]["median"] < 1.5 and s["points_mm"]["p95"] < 4.0  # 4 mm voxels
    assert s["lesions_mm"]["median"] < 2.5
    assert s["dice"]["GM"] > 0.85 and s["dice"]["WM"] > 0.85
    assert s["dice_identity"]["GM"] < 0.7  # the warp is far from the identity


def test_default_schedule_no_worse_than_reference(known_scores):
    """Issue 20: the faster schedule may not lose accuracy against the schedule it replaced."""
    _, fast = known_scores["fast"]
    _, ref = known_scores["reference"]
    assert fast["points_mm"]["median"] <= ref["points_mm"]["median"] * 1.1 + 0.05
    assert fast["lesions_mm"]["median"] <= ref["lesions_mm"]["median"] * 1.1 + 0.05
    for tissue in ("GM", "WM"):
        assert fast["dice"][tissue] >= ref["dice"][tissue] - 0.01


def test_unknown_schedule_refused(known_case, tmp_path):
    with pytest.raises(ValueError, match="schedule"):
        register_to_template(known_case.subject, known_case.template, out_prefix=tmp_path / "x_",
                             schedule="quick")
    with pytest.raises(ValueError, match="contradicts"):
        register_to_template(known_case.subject, known_case.template, out_prefix=tmp_path / "x_",
                             schedule="fast", sloppy=True)

"""Registration to MNI152NLin2009aSym (sloppy: 4 mm, seconds): transforms, resampling, point mapping."""

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
pytestmark = pytest.mark.skipif(not (MRICRON / "ch2bet.nii.gz").is_file(),
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


def test_centroid_maps_to_warped_blob_centroid(registered, template):
    """points_to_template (inverse transforms, LPS<->RAS) agrees with warping the image (forward)."""
    brain, res = registered
    for offset in ((8, 4, 6), (-10, -6, 2)):
        blob = _blob(brain, offset)
        mapped = points_to_template(_centroid_mm(blob)[None], res)[0]
        warped = apply_to_template(blob, res, template, interpolation="linear")
        assert np.linalg.norm(mapped - _centroid_mm(warped)) < 2.0  # one template voxel (2 mm)


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


def test_points_edge_cases(registered):
    _, res = registered
    assert points_to_template(np.zeros((0, 3)), res).shape == (0, 3)
    assert points_to_template([1.0, 2.0, 3.0], res).shape == (1, 3)


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

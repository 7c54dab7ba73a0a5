"""End-to-end engine tests: real nnU-Net v2 model folders built here, the real predictor, reorientation,
post-processing and the lesion table."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.engine import CLSegmenter, load_model, segment
from bids_cl.engine import orientation as orient
from bids_cl.engine import testing as T
from bids_cl.errors import BidsClError

SHAPE = (40, 44, 36)
RADII = (16, 18, 14)
BLOBS = [((4.0, 4.0, 3.0), 2.0), ((-7.0, 7.0, -3.0), 1.5), ((8.0, -8.0, 3.0), 2.2)]
WARNING = "test model: not for real data"


@pytest.fixture(scope="module")
def pointwise_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Norm-free network whose output depends on the voxel's normalised intensity only.

    Fold 1 uses a stricter intensity threshold, so the folds disagree on lesion extent.
    """
    plans, dj = T.tiny_plans(norm=False), T.tiny_dataset_json()
    return T.write_model_folder(
        tmp_path_factory.mktemp("pointwise") / "model", plans, dj,
        {0: T.intensity_weights(plans, dj, z_threshold=3.0),
         1: T.intensity_weights(plans, dj, z_threshold=8.0)},
        settings={"name": "pointwise", "description": "test", "warning": WARNING, "orientation": "RAS"})


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ordinary nnU-Net (instance norm, 3 stages) with seeded random weights: not flip-equivariant."""
    plans, dj = T.tiny_plans(), T.tiny_dataset_json()
    return T.write_model_folder(tmp_path_factory.mktemp("random") / "model", plans, dj,
                                {0: T.random_weights(plans, dj, seed=3)})


def _phantom(axcodes: str = "RAS", rotation: float = 0.0, zooms=(1.0, 1.0, 1.0)) -> nib.Nifti1Image:
    affine = T.centred_affine(SHAPE, zooms=zooms, axcodes=axcodes, rotation_deg=rotation)
    return T.phantom(SHAPE, affine, brain_radii=RADII, blobs=BLOBS)


def _match_blobs(table) -> list[float]:
    """Distance (mm) from each blob centre to the nearest lesion centroid."""
    cents = table[["centroid_x", "centroid_y", "centroid_z"]].to_numpy()
    return [float(np.min(np.linalg.norm(cents - np.array(c), axis=1))) for c, _ in BLOBS]


def test_segment_end_to_end(pointwise_model: Path, tmp_path: Path) -> None:
    img = _phantom()
    img.set_qform(img.affine, code=2)
    img.set_sform(img.affine, code=4)
    path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(img, path)
    res = segment(str(path), str(pointwise_model), device="cpu", nthreads=1)

    for out, dtype in ((res.probability, np.float32), (res.mask, np.uint8)):
        assert out.shape == SHAPE and out.get_data_dtype() == dtype
        np.testing.assert_allclose(out.affine, img.affine)
        assert int(out.header["qform_code"]) == 2 and int(out.header["sform_code"]) == 4
    prob, mask = res.probability.get_fdata(), np.asarray(res.mask.dataobj)
    assert np.array_equal(mask > 0, prob > 0.5)
    assert prob[np.asarray(img.dataobj) == 0].max() == 0.0  # nothing outside the brain

    table = res.lesions
    assert len(table) == 3 and max(_match_blobs(table)) < 0.5
    labels = np.asarray(res.labels.dataobj)
    for row in table.itertuples():
        assert (labels == row.lesion_id).sum() == row.voxels
    # Fold 1 is stricter: its lesions are smaller, so every lesion has some fold disagreement.
    assert len(res.fold_probabilities) == 2
    assert (table.uncertainty > 0.05).all() and (table.uncertainty < 1).all()

    s = res.summary
    assert s["LesionCount"] == 3 and s["TotalVolume_uL"] == pytest.approx(table.volume_ul.sum())
    assert s["OODWarning"] is None and s["Threshold"] == 0.5 and s["Connectivity"] == 26
    assert s["Folds"] == [0, 1] and s["TTA"] is False and s["Device"] == "cpu"
    assert WARNING in s["Warnings"] and s["Model"]["warning"] == WARNING
    prov = res.provenance
    assert prov["name"] == "pointwise" and prov["trainer"] == "nnUNetTrainer"
    assert prov["configuration"] == "3d_fullres" and prov["patch_size"] == [32, 32, 32]
    assert prov["channel_names"] == {"0": "T1w"} and set(prov["files"]) >= {"plans.json",
                                                                           "fold_0/checkpoint_final.pth"}
    json.dumps(s)  # the summary must serialise as is


def test_fold_disagreement_from_bool_fold_masks(pointwise_model: Path) -> None:
    """Without kept fold maps the segmenter carries each fold's thresholded mask only (bool, a quarter of
    a float map: 5 folds at 0.5 mm were 1.1 GB of float maps), with the same lesion table."""
    img = _phantom()
    keeping = CLSegmenter(str(pointwise_model), device="cpu", nthreads=1)
    lean = CLSegmenter(str(pointwise_model), device="cpu", nthreads=1, keep_fold_probabilities=False)
    probabilities = lean.infer(lean.prepare(img))
    assert probabilities.folds == [] and len(probabilities.fold_masks) == 2
    assert all(m.dtype == np.bool_ and m.shape == SHAPE for m in probabilities.fold_masks)
    kept = keeping.segment(img)
    assert [np.array_equal(m, np.asarray(f.dataobj) > 0.5)
            for m, f in zip(probabilities.fold_masks, kept.fold_probabilities, strict=True)] == [True, True]
    table = lean.measure(probabilities).lesions
    assert table.equals(kept.lesions) and (table.uncertainty > 0.05).all()


@pytest.mark.parametrize(("axcodes", "rotation", "zooms"), [
    ("LPS", 0.0, (1.0, 1.0, 1.0)),
    ("PIL", 0.0, (1.1, 0.9, 1.0)),
    ("RAS", 25.0, (1.0, 1.0, 1.0)),   # oblique: resampled phantom, closest canonical order
    ("LAS", -20.0, (0.9, 1.0, 1.1)),
])
def test_same_lesions_in_world_space(pointwise_model: Path, axcodes: str, rotation: float,
                                     zooms: tuple[float, float, float]) -> None:
    seg = CLSegmenter(str(pointwise_model), device="cpu", folds=[0], nthreads=1)
    ref = seg.segment(_phantom()).lesions
    res = seg.segment(_phantom(axcodes, rotation, zooms))
    assert nib.aff2axcodes(res.mask.affine) == nib.aff2axcodes(_phantom(axcodes, rotation, zooms).affine)
    table = res.lesions
    assert len(table) == len(ref) == 3
    assert max(_match_blobs(table)) < 0.6
    # Non-1 mm voxels are resampled by nnU-Net (cubic spline): the hard brain edge then changes the
    # z-score statistics a little, and with them the extent of these threshold-defined lesions.
    rtol = 0.2 if zooms == (1.0, 1.0, 1.0) else 0.5
    np.testing.assert_allclose(np.sort(table.volume_ul), np.sort(ref.volume_ul), rtol=rtol)


@pytest.mark.parametrize("axcodes", ["LPS", "SAL"])
def test_reorientation_is_exact_for_a_non_equivariant_net(random_model: Path, axcodes: str) -> None:
    """Same voxels stored in another axis order: the network must see the identical RAS array."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    ras = _phantom()
    other = ras.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes))))
    assert "".join(nib.aff2axcodes(other.affine)) == axcodes
    plan = orient.plan_reorientation(other.affine, other.shape, other.header.get_zooms(), "RAS")
    np.testing.assert_allclose(orient.model_affine(other.affine, plan), ras.affine, atol=1e-6)
    seg = CLSegmenter(str(random_model), device="cpu", nthreads=1)
    p_ras = seg.segment(ras).probability.get_fdata()
    p_other = seg.segment(other).probability.get_fdata()
    np.testing.assert_allclose(orient.to_model_order(p_other, plan), p_ras, atol=1e-6)


def test_array_matches_nnunet_readers(tmp_path: Path) -> None:
    """Our array/spacing equal what nnU-Net's own readers produce from the (reoriented) file."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    zooms = (0.8, 1.2, 1.5)
    lps = _phantom("LPS", zooms=zooms)
    lps_path = tmp_path / "lps.nii.gz"
    nib.save(lps, lps_path)
    plan = orient.plan_reorientation(lps.affine, lps.shape, lps.header.get_zooms(), "RAS")
    ours = orient.to_nnunet_array(orient.to_model_order(lps.get_fdata(dtype=np.float32), plan))
    spacing = orient.nnunet_spacing(plan.model_zooms)
    ras_img = nib.as_closest_canonical(lps)
    ras_path = tmp_path / "ras.nii.gz"
    nib.save(ras_img, ras_path)
    for reader, path in ((SimpleITKIO(), ras_path), (NibabelIOWithReorient(), lps_path)):
        arr, props = reader.read_images([str(path)])
        assert arr.shape == ours.shape
        np.testing.assert_allclose(arr, ours, atol=1e-3)
        np.testing.assert_allclose(props["spacing"], spacing, atol=1e-5)


def test_brain_mask_and_min_size(pointwise_model: Path) -> None:
    img = _phantom()
    seg = CLSegmenter(str(pointwise_model), device="cpu", folds=[0], nthreads=1)
    full = seg.segment(img).lesions
    # A brain mask that leaves out the third blob: the image is zeroed there, no lesion can be found.
    xyz = nib.affines.apply_affine(img.affine, np.indices(SHAPE).reshape(3, -1).T).reshape(*SHAPE, 3)
    mask = (np.asarray(img.dataobj) > 0) & (np.linalg.norm(xyz - np.array(BLOBS[2][0]), axis=-1) > 5)
    masked = seg.segment(img, brain_mask=nib.Nifti1Image(mask.astype(np.uint8), img.affine)).lesions
    assert len(masked) == 2
    smallest = float(full.volume_ul.min())
    seg.min_lesion_size = f"{smallest + 1:.1f}uL"
    filtered = seg.segment(img)
    assert len(filtered.lesions) == 2 and filtered.lesions.volume_ul.min() > smallest
    assert filtered.summary["MinLesionSizeVoxels"] == int(np.ceil(smallest + 1))
    seg.min_lesion_size = int(full.voxels.max()) + 1
    assert seg.segment(img).summary["LesionCount"] == 0


def test_ood_warning_reaches_summary(pointwise_model: Path) -> None:
    img = _phantom()
    scaled = nib.Nifti1Image(np.asarray(img.dataobj) / 1000.0, img.affine)  # a 0-1 rescaled image
    res = segment(scaled, str(pointwise_model), device="cpu", folds=[0], nthreads=1)
    assert res.summary["OODWarning"] and "median" in res.summary["OODWarning"]
    # z-scoring makes the network itself indifferent to the scale: same lesions.
    assert res.summary["LesionCount"] == 3


def test_cpu_tta_and_errors(pointwise_model: Path, tmp_path: Path) -> None:
    res = segment(_phantom(), str(pointwise_model), device="cpu", folds=["0"], tta=True, nthreads=1)
    assert res.summary["TTA"] is True and res.summary["LesionCount"] == 3 and res.fold_probabilities is None
    assert (res.lesions.uncertainty == 0).all()  # one fold: uncertainty 0 by definition
    with pytest.raises(BidsClError) as err:
        segment(tmp_path / "missing.nii.gz", str(pointwise_model), device="cpu")
    assert err.value.code == 66
    with pytest.raises(BidsClError) as err:
        load_model(str(pointwise_model)).select_folds([7])
    with pytest.raises(BidsClError) as err:
        segment(_phantom(), str(pointwise_model), device="cpu", connectivity=4)
    assert err.value.code == 64
    bad_mask = nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4))
    with pytest.raises(BidsClError) as err:
        segment(_phantom(), str(pointwise_model), device="cpu", brain_mask=bad_mask)
    assert err.value.code == 65


def test_model_tuned_postprocessing_is_the_default(tmp_path: Path) -> None:
    """A model carrying postprocessing (bids_cl-train's tune step) is cut at its threshold and minimum size
    unless the caller gives them; the summary says which values were used and where they came from."""
    plans, dj = T.tiny_plans(norm=False), T.tiny_dataset_json()
    weights = {0: T.intensity_weights(plans, dj, z_threshold=3.0)}

    def model(postprocessing: dict | None) -> Path:
        settings = {"name": "tuned", "orientation": "RAS",
                    **({"postprocessing": postprocessing} if postprocessing else {})}
        return T.write_model_folder(tmp_path / f"m{len(list(tmp_path.iterdir()))}", plans, dj, weights,
                                    settings=settings)

    img = _phantom()
    plain = CLSegmenter(str(model(None)), device="cpu", nthreads=1).segment(img).summary
    assert plain["Threshold"] == 0.5 and plain["ThresholdSource"] == "default"
    tuned_model = model({"threshold": 0.01})
    tuned = CLSegmenter(str(tuned_model), device="cpu", nthreads=1).segment(img).summary
    assert tuned["Threshold"] == 0.01 and tuned["ThresholdSource"] == "model"
    assert tuned["TotalVolume_uL"] > plain["TotalVolume_uL"] and plain["LesionCount"] == 3
    user = CLSegmenter(str(tuned_model), device="cpu", nthreads=1, threshold=0.5).segment(img).summary
    assert user["Threshold"] == 0.5 and user["ThresholdSource"] == "user" and user["LesionCount"] == 3
    with pytest.raises(BidsClError, match="postprocessing.threshold"):
        CLSegmenter(str(model({"threshold": 1.5})), device="cpu", nthreads=1)

    # The tuned minimum lesion size (µL): a size just above the smallest blob's drops that blob only.
    smallest = float(CLSegmenter(str(model(None)), device="cpu", nthreads=1).segment(img).lesions
                     .volume_ul.min())
    sized_model = model({"threshold": 0.5, "min_lesion_size_ul": smallest + 1})
    sized = CLSegmenter(str(sized_model), device="cpu", nthreads=1).segment(img).summary
    assert sized["LesionCount"] == 2 and sized["MinLesionSizeSource"] == "model"
    assert sized["MinLesionSize"] == f"{smallest + 1:g}uL" and sized["MinLesionSizeVoxels"] > 0
    assert plain["MinLesionSize"] is None and plain["MinLesionSizeSource"] == "default"
    every = CLSegmenter(str(sized_model), device="cpu", nthreads=1, min_lesion_size=0).segment(img).summary
    assert every["LesionCount"] == 3 and every["MinLesionSizeSource"] == "user"  # 0 keeps every lesion
    for bad in (-1, "80uL", True):
        with pytest.raises(BidsClError, match="postprocessing.min_lesion_size_ul") as err:
            CLSegmenter(str(model({"min_lesion_size_ul": bad})), device="cpu", nthreads=1)
        assert err.value.code == 65

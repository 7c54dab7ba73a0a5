"""The training path (bids_cl-train): conversion, plans edit, splits, trainer lookup, and one tiny end-to-end
run (convert -> plan/preprocess -> train -> model folder -> nnUNetPredictor) plus a fine-tune from it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import write_bids, write_nifti

from bids_cl.errors import EXIT_BAD_DATA, BidsClError
from bids_cl.train.convert import build_raw_dataset, find_cases
from bids_cl.train.plans import NetworkSpec, reduce_configuration, write_splits
from bids_cl.utils.bids import discover, make_layout


def _ball(shape: tuple[int, int, int], centre: np.ndarray, radius: float) -> np.ndarray:
    grid = np.indices(shape).reshape(3, -1).T
    return (np.linalg.norm(grid - centre, axis=1) <= radius).reshape(shape)


def make_tiny_bids(root: Path, *, n_subjects: int = 4, size: int = 40, zoom: float = 2.0,
                   seed: int = 0) -> tuple[Path, Path]:
    """``root/bids`` (T1w, one session) and ``root/bids/derivatives/manual_masks`` (CL + brain masks).

    A head is a ball of "brain" inside a brighter "skull" shell; lesions are small bright balls in the
    brain. The affine is LPS-like (flipped x/y) so the RAS reorientation is exercised.
    """
    rng = np.random.default_rng(seed)
    bids = root / "bids"
    labels = bids / "derivatives" / "manual_masks"
    (bids).mkdir(parents=True, exist_ok=True)
    (bids / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    affine = np.diag([-zoom, -zoom, zoom, 1.0])
    affine[:3, 3] = [size * zoom / 2, size * zoom / 2, -size * zoom / 2]
    shape = (size, size, size)
    centre = np.array(shape) / 2
    for s in range(1, n_subjects + 1):
        sub = f"sub-{s:02d}"
        anat = bids / sub / "ses-01" / "anat"
        anat.mkdir(parents=True, exist_ok=True)
        labels_sub = labels / sub / "ses-01" / "anat"
        labels_sub.mkdir(parents=True, exist_ok=True)
        brain = _ball(shape, centre, size * 0.36)
        head = _ball(shape, centre, size * 0.46)
        img = np.where(head, 160.0, 0.0) + np.where(brain, -60.0, 0.0)
        cl = np.zeros(shape, bool)
        for _ in range(0 if s == n_subjects else 3):  # the last subject is lesion-free
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            c = centre + direction * size * 0.25
            cl |= _ball(shape, c, rng.uniform(2.0, 3.0)) & brain
        img = np.where(cl, 190.0, img) + rng.normal(0, 5, shape) * head
        prefix = f"{sub}_ses-01"
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), str(anat / f"{prefix}_T1w.nii.gz"))
        nib.save(nib.Nifti1Image(cl.astype(np.uint8), affine),
                 str(labels_sub / f"{prefix}_label-CL_mask.nii.gz"))
        nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine),
                 str(labels_sub / f"{prefix}_desc-brain_mask.nii.gz"))
    return bids, labels


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_bids(tmp_path_factory.mktemp("tiny"))


def test_find_cases_pairs_images_with_masks(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    bids, labels = tiny
    extra = bids / "sub-09" / "ses-01" / "anat" / "sub-09_ses-01_T1w.nii.gz"  # no manual mask
    extra.parent.mkdir(parents=True)
    data = np.zeros((4, 4, 4), np.float32)
    data[1:3, 1:3, 1:3] = 100.0  # an image with signal (an all-zero one is refused by discovery)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(extra))
    try:
        cases, unannotated = find_cases(bids, labels)
    finally:
        extra.unlink()
        extra.parent.rmdir()
    assert [c.case_id for c in cases] == [f"sub-0{i}_ses-01" for i in range(1, 5)]
    assert unannotated == ["sub-09_ses-01"]
    assert {c.sequence for c in cases} == {"MPRAGE"}
    assert all(c.brain_mask is not None for c in cases)
    only = find_cases(bids, labels, participants=["sub-02"])[0]
    assert [c.participant for c in only] == ["02"]


def _seen_by_inference(root: Path) -> list[tuple]:
    return [(i.prefix, i.target, i.sequence, i.inv2) for i in discover(make_layout(root)).items]


def _seen_by_training(cases: list) -> list[tuple]:
    return [(c.case_id, str(c.image), c.sequence, str(c.inv2) if c.inv2 else None) for c in cases]


def test_training_pairs_a_uni_filed_as_t1w_with_its_inv2_as_inference_does(tmp_path: Path) -> None:
    """bids_cl-synth --sequence both --uni-as-t1w: the UNI is ``acq-UNI_T1w``, its inversions
    ``acq-mp2rage_inv-*``. Training's old globs looked for ``<prefix>_inv-2`` (with or without acq-) and
    found no INV2, so the UNI was skull stripped without it, unlike at inference."""
    from bids_cl.synth.generate import generate_dataset

    root = generate_dataset(tmp_path / "ph", participants=1, seed=0, size="tiny", sequence="both",
                            uni_as_t1w=True, lesion_free_fraction=0.0)
    cases = find_cases(root, root / "derivatives" / "manual_masks", log=lambda _m: None)[0]
    assert _seen_by_training(cases) == _seen_by_inference(root)
    uni = {c.case_id: c for c in cases}["sub-01_ses-01_acq-UNI"]
    assert uni.sequence == "MP2RAGE"
    assert uni.inv2 is not None and uni.inv2.name == "sub-01_ses-01_acq-mp2rage_inv-2_part-mag_MP2RAGE.nii.gz"


def test_training_follows_discovery_where_the_old_globs_did_not(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {
        # a UNI filed as T1w, recognised by its sidecar only (no acq-uni, no PulseSequenceType)
        "sub-01/anat/sub-01_acq-highres_T1w.nii.gz": {
            "InversionTime": [0.7, 2.5], "SeriesDescription": "t1_mp2rage_sag_p3_UNI_Images"},
        "sub-01/anat/sub-01_inv-2_part-mag_MP2RAGE.nii.gz": None,
        # UNIT1 and T1w sharing acq-fast: the UNIT1's prefix becomes acq-fastUNIT1 (one acq- entity)
        "sub-02/anat/sub-02_acq-fast_UNIT1.nii.gz": None,
        "sub-02/anat/sub-02_acq-fast_T1w.nii.gz": None,
        # the INV2 magnitude, never its imaginary part (which sorts first by name)
        "sub-03/anat/sub-03_UNIT1.nii.gz": None,
        "sub-03/anat/sub-03_inv-2_part-imag_MP2RAGE.nii.gz": None,
        "sub-03/anat/sub-03_inv-2_part-mag_MP2RAGE.nii.gz": None,
        # an unreadable (0-byte) image with a mask: reported and skipped, not converted
        "sub-04/anat/sub-04_T1w.nii.gz": {"__empty__": True},
    })
    labels = tmp_path / "masks"
    for prefix in ("sub-01_acq-highres", "sub-02_acq-fast", "sub-02_acq-fastUNIT1", "sub-03", "sub-04",
                   "sub-01_run-1"):  # the last one names no image
        write_nifti(labels / f"{prefix}_label-CL_mask.nii.gz", value=0.0)
    log: list[str] = []
    cases, unannotated = find_cases(root, labels, log=log.append)
    assert _seen_by_training(cases) == _seen_by_inference(root)
    by_id = {c.case_id: c for c in cases}
    assert sorted(by_id) == ["sub-01_acq-highres", "sub-02_acq-fast", "sub-02_acq-fastUNIT1", "sub-03"]
    assert unannotated == []
    assert by_id["sub-01_acq-highres"].sequence == "MP2RAGE"
    assert by_id["sub-01_acq-highres"].inv2.name == "sub-01_inv-2_part-mag_MP2RAGE.nii.gz"
    assert by_id["sub-02_acq-fastUNIT1"].image.name == "sub-02_acq-fast_UNIT1.nii.gz"
    assert by_id["sub-03"].inv2.name == "sub-03_inv-2_part-mag_MP2RAGE.nii.gz"
    assert [line for line in log if "sub-04_T1w.nii.gz" in line] == [
        "warning: skipped: sub-04_T1w.nii.gz is an empty (0-byte) file"]
    assert any(line.startswith("warning: 2 manual mask(s) match no image") and line.endswith(
        ": sub-01_run-1, sub-04") for line in log)
    # --sequence selects by discovery's sequence, evidence included
    mp2rage = find_cases(root, labels, sequences=["MP2RAGE"], log=lambda _m: None)[0]
    assert [c.case_id for c in mp2rage] == ["sub-01_acq-highres", "sub-02_acq-fastUNIT1", "sub-03"]


def test_no_usable_image_is_one_error_with_discoverys_code(tmp_path: Path) -> None:
    root = write_bids(tmp_path / "bids", {"sub-01/anat/sub-01_T1w.nii.gz": {"__empty__": True}})
    write_nifti(tmp_path / "masks" / "sub-01_label-CL_mask.nii.gz", value=0.0)
    with pytest.raises(BidsClError) as err:
        find_cases(root, tmp_path / "masks", log=lambda _m: None)
    assert err.value.code == EXIT_BAD_DATA
    assert "sub-01_T1w.nii.gz is an empty (0-byte) file" in err.value.message


def test_convert_strips_zeroes_background_and_reorients(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    bids, labels = tiny
    cases = find_cases(bids, labels, participants=["01"])[0]
    raw = tmp_path / "Dataset999_T"
    build_raw_dataset(cases, raw, skull_strip="truth-mask", log=lambda _m: None)
    img = nib.load(str(raw / "imagesTr" / "sub-01_ses-01_0000.nii.gz"))
    seg = nib.load(str(raw / "labelsTr" / "sub-01_ses-01.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")  # the source is LPS-like
    assert np.allclose(img.affine, seg.affine)
    brain = nib.as_closest_canonical(nib.load(str(cases[0].brain_mask))).get_fdata() > 0
    data = img.get_fdata()
    assert np.all(data[~brain] == 0) and np.all(data[brain] != 0)  # skull gone, background exactly 0
    assert set(np.unique(seg.get_fdata())) == {0.0, 1.0}
    source_lesions = nib.load(str(cases[0].label)).get_fdata().sum()
    assert seg.get_fdata().sum() == source_lesions
    meta = json.loads((raw / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1w"} and meta["labels"] == {"background": 0, "CL": 1}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"


def _conf() -> dict:
    return {"patch_size": [128, 128, 128], "batch_size": 2, "architecture": {"arch_kwargs": {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "n_conv_per_stage": [2] * 6, "n_conv_per_stage_decoder": [2] * 5}}}


def test_reduce_configuration_caps_network_consistently() -> None:
    conf = reduce_configuration(_conf(), NetworkSpec(max_stages=4, base_features=16, max_features=48,
                                                     patch_size=(60, 64, 70), batch_size=4,
                                                     batch_dice=True))
    arch = conf["architecture"]["arch_kwargs"]
    assert arch["n_stages"] == 4 and arch["features_per_stage"] == [16, 32, 48, 48]
    assert len(arch["kernel_sizes"]) == len(arch["strides"]) == len(arch["n_conv_per_stage"]) == 4
    assert len(arch["n_conv_per_stage_decoder"]) == 3
    assert conf["patch_size"] == [64, 64, 72]  # rounded up to multiples of the 8x downsampling
    assert conf["batch_size"] == 4 and conf["batch_dice"] is True
    assert _conf()["architecture"]["arch_kwargs"]["n_stages"] == 6  # input untouched
    assert reduce_configuration(_conf(), NetworkSpec()) == _conf()


def test_splits_keep_participants_together(tmp_path: Path) -> None:
    cases = {f"sub-{p}_ses-{s}": p for p in ("01", "02", "03", "04", "05") for s in ("01", "02")}
    one = write_splits(tmp_path, cases, folds=1, val_fraction=0.2, seed=0)
    assert len(one) == 1 and len(one[0]["val"]) == 2 and len(one[0]["train"]) == 8
    assert len({cases[c] for c in one[0]["val"]}) == 1
    folds = write_splits(tmp_path, cases, folds=5, val_fraction=0.2, seed=0)
    assert sorted(c for f in folds for c in f["val"]) == sorted(cases)
    for f in folds:
        assert not {cases[c] for c in f["val"]} & {cases[c] for c in f["train"]}
    assert json.loads((tmp_path / "splits_final.json").read_text()) == folds


def test_trainer_is_found_by_name_through_ext_trainer_shim(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from bids_cl.train.trainers import (
        BidsClTrainer,
        TrainerSettings,
        inference_compatible,
        register_ext_trainer_dir,
    )

    monkeypatch.setenv("nnUNet_extTrainer", "")
    register_ext_trainer_dir(tmp_path / "ext")
    assert recursive_find_trainer_class_by_name("BidsClTrainer") is BidsClTrainer
    assert inference_compatible(BidsClTrainer)  # so exported checkpoints can say nnUNetTrainer
    settings = TrainerSettings(num_epochs=3, iterations_per_epoch=2, time_budget_s=9.0)
    monkeypatch.setenv("BIDS_CL_TRAINER_SETTINGS", settings.to_env())
    assert TrainerSettings.from_env() == settings


def _predict(model_dir: Path, image: Path) -> np.ndarray:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, verbose_preprocessing=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=None)
    img = nib.load(str(image))
    data = np.asarray(img.dataobj, dtype=np.float32).transpose(2, 1, 0)[None]  # nnU-Net axis order
    spacing = [float(z) for z in img.header.get_zooms()[::-1]]
    return predictor.predict_single_npy_array(data, {"spacing": spacing}, None, None, False)


@pytest.mark.slow
def test_train_end_to_end_then_fine_tune(tiny: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bids_cl.train.cli import main

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer",
                "nnUNet_n_proc_DA", "nnUNet_def_n_proc", "nnUNet_compile"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test
    threads = torch.get_num_threads()
    bids, labels = tiny
    work = tmp_path / "work"
    common = ["--skull-strip", "truth-mask", "--device", "cpu", "--nthreads", "1", "--n-proc-da", "0",
              "--iterations-per-epoch", "3", "--val-iterations", "1"]
    try:
        rc = main([str(bids), str(labels), str(work), "--target-spacing", "2", "--max-stages", "3",
                   "--base-features", "4", "--max-features", "16", "--patch-size", "32",
                   "--epochs", "50", "--time-budget-min", "0.1", "--name", "tiny", *common])
        assert rc == 0
        model = work / "model"
        meta = json.loads((model / "bids_cl_model.json").read_text())
        assert meta["orientation"] == "RAS" and meta["name"] == "tiny"
        assert meta["trainer_class"] == "bids_cl.train.trainers.BidsClTrainer"
        assert 1 <= meta["training"]["folds"][0]["epochs"] < 50  # the time budget stopped it
        # the tune step chose a threshold on the validation split and re-locked the model
        from bids_cl.engine.models import resolve_model
        from bids_cl.train.tune import MIN_SIZE_GRID_VOXELS, THRESHOLD_GRID

        tuned_on = meta["postprocessing"]
        assert tuned_on["threshold"] in THRESHOLD_GRID and tuned_on["validation_cases"] >= 1
        assert tuned_on["min_lesion_size_voxels"] in MIN_SIZE_GRID_VOXELS
        voxels = tuned_on["min_lesion_size_voxels"]
        assert tuned_on["min_lesion_size_ul"] == pytest.approx(voxels * 8.0)  # 2 mm phantom voxels
        assert set(tuned_on["f1_grid"]) >= {f"{t:.2f}" for t in THRESHOLD_GRID}
        assert set(tuned_on["f1_grid"]["0.50"]) == {str(v) for v in MIN_SIZE_GRID_VOXELS}
        assert tuned_on["f1"] == max(max(row.values()) for row in tuned_on["f1_grid"].values())
        assert resolve_model(model).trust == "lock"
        for fname in ("dataset.json", "plans.json", "dataset_fingerprint.json",
                      "fold_0/checkpoint_final.pth"):
            assert (model / fname).is_file(), fname
        # torch's own safe loader reads it, no allow-list needed: the export made the log values plain
        ckpt = torch.load(str(model / "fold_0" / "checkpoint_final.pth"), weights_only=True)
        assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["optimizer_state"] is None

        case = work / "nnUNet_raw" / "Dataset501_BidsClCL" / "imagesTr" / "sub-01_ses-01_0000.nii.gz"
        seg = _predict(model, case)
        assert seg.shape == nib.load(str(case)).shape[::-1]
        assert set(np.unique(seg)) <= {0, 1}

        # A lab fine-tuning that model on "its own" data: same plans, weights as the start point.
        tuned = tmp_path / "tuned"
        source_batch = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"][
            "batch_size"]
        rc = main([str(bids), str(labels), str(tmp_path / "work2"), "--from-model", str(model),
                   "--epochs", "1", "--participant-label", "01", "02", "--output-model", str(tuned),
                   "--batch-size", str(source_batch + 1), *common])
        assert rc == 0
        # --batch-size applies to a fine-tune (a GPU takes larger batches) and is recorded in its plans
        assert json.loads((tuned / "plans.json").read_text())["configurations"]["3d_fullres"][
            "batch_size"] == source_batch + 1
        assert json.loads((tuned / "plans.json").read_text())["configurations"]["3d_fullres"][
            "architecture"] == json.loads((model / "plans.json").read_text())["configurations"][
            "3d_fullres"]["architecture"]
        tuned_meta = json.loads((tuned / "bids_cl_model.json").read_text())
        source = tuned_meta["training"]["fine_tuned_from"]
        assert source["path"] == str(model)
        assert source["checkpoints_sha256"] == {
            "fold_0/checkpoint_final.pth": hashlib.sha256(
                (model / "fold_0" / "checkpoint_final.pth").read_bytes()).hexdigest()}
        assert tuned_meta["training"]["participants"] == ["01", "02"]
        assert _predict(tuned, case).shape == seg.shape
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_convert_uses_the_workflow_skull_strip(tmp_path: Path) -> None:
    """Default conversion = the participant workflow's skull stripping (bids_cl.preproc), not the truth."""
    from bids_cl.synth.generate import generate_dataset

    root = generate_dataset(tmp_path / "ph", participants=1, seed=3, size="tiny", sequence="mp2rage",
                            lesion_free_fraction=0.0)
    cases = find_cases(root, root / "derivatives" / "manual_masks")[0]
    assert cases[0].inv2 is not None and cases[0].sequence == "MP2RAGE"
    build_raw_dataset(cases, tmp_path / "Dataset998_T", skull_strip="auto", log=lambda _m: None)
    assert cases[0].record["skull_strip"] not in ("truth-mask", "none")
    img = nib.load(str(tmp_path / "Dataset998_T" / "imagesTr" / f"{cases[0].case_id}_0000.nii.gz"))
    brain = img.get_fdata() != 0
    truth = nib.as_closest_canonical(nib.load(str(cases[0].brain_mask))).get_fdata() > 0
    assert 2 * (brain & truth).sum() / (brain.sum() + truth.sum()) > 0.9


def _loader(offset: float):
    from types import SimpleNamespace

    from bids_cl.train.trainers import OffCentreDataLoader

    data = SimpleNamespace(identifiers=["case"])
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    # initial (augmentation) patch 40^3 around a final 32^3 patch, as nnU-Net's trainer builds them
    return OffCentreDataLoader(data, 1, (40, 40, 40), (32, 32, 32), labels, oversample_foreground_percent=1.0,
                               foreground_offset=offset)


@pytest.mark.parametrize("offset", [0.0, 0.8])
def test_foreground_patches_are_moved_off_the_lesion(offset: float) -> None:
    """nnU-Net centres every lesion-forced patch on the lesion voxel; the offset spreads it over the patch."""
    loader = _loader(offset)
    voxel = np.array([50, 60, 40])
    locations = {1: np.array([[0, *voxel]])}
    positions = []
    for _ in range(400):
        lbs, ubs = loader.get_bbox(np.array([100, 120, 90]), True, locations)
        assert (np.array(ubs) - np.array(lbs) == 40).all()
        # position of the lesion voxel in the final patch (centre crop of the initial one)
        positions.append(voxel - (np.array(lbs) + 4))
    positions = np.array(positions)
    assert ((positions >= 0) & (positions < 32)).all()  # the lesion is always in the patch the net sees
    if offset == 0:
        assert (positions == 16).all()
    else:
        reach = int(16 * offset)
        assert positions.min() == 16 - reach and positions.max() == 16 + reach
        assert positions.std() > reach / 3


def test_foreground_offset_stays_inside_the_image() -> None:
    loader = _loader(0.8)
    shape = np.array([36, 36, 36])
    for voxel in ([0, 0, 0], [35, 35, 35], [18, 2, 33]):
        for _ in range(50):
            lbs, ubs = loader.get_bbox(shape, True, {1: np.array([[0, *voxel]])})
            # nnU-Net's admissible range: padding of (40 - 32) // 2 = 4 voxels beyond each side at most
            assert (np.array(lbs) >= -4).all() and (np.array(ubs) <= shape + 4).all()


def _locked_model(root: Path) -> Path:
    """A model folder as bids_cl exports it (plans, one fold, lock); the checkpoint is never unpickled."""
    from bids_cl.engine.lockfile import write_lock_file

    (root / "fold_0").mkdir(parents=True)
    for fname in ("plans.json", "dataset.json"):
        (root / fname).write_text("{}\n")
    (root / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights as exported")
    write_lock_file(root)
    return root


def test_from_model_is_trust_checked_like_inference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--from-model goes through the engine's lock check: a changed checkpoint is refused before loading."""
    from bids_cl.errors import EXIT_BAD_DATA
    from bids_cl.train.cli import main

    model = _locked_model(tmp_path / "model")
    (model / "fold_0" / "checkpoint_final.pth").write_bytes(b"tampered")
    rc = main([str(tmp_path / "bids"), str(tmp_path / "labels"), str(tmp_path / "work"),
               "--from-model", str(model)])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_DATA
    assert "changed file" in err and "fold_0/checkpoint_final.pth" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("option", [["--max-stages", "3"], ["--patch-size", "48"], ["--small-network"]])
def test_from_model_refuses_network_changes(tmp_path: Path, capsys: pytest.CaptureFixture,
                                            option: list[str]) -> None:
    """The source model's weights only fit its own network: a change is a usage error, not ignored."""
    from bids_cl.errors import EXIT_USAGE
    from bids_cl.train.cli import main

    rc = main([str(tmp_path / "bids"), str(tmp_path / "labels"), str(tmp_path / "work"),
               "--from-model", "demo", "--batch-size", "8", *option])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_USAGE
    assert len(err.splitlines()) == 1 and option[0] in err and "--from-model demo" in err
    assert not (tmp_path / "work").exists()


def test_batch_settings_leave_the_network_alone() -> None:
    from bids_cl.train.plans import NetworkSpec, apply_batch_settings

    conf = {"batch_size": 4, "batch_dice": False, "patch_size": [32, 32, 32], "architecture": {"n": 4}}
    assert apply_batch_settings(dict(conf), NetworkSpec()) == conf
    assert apply_batch_settings(conf, NetworkSpec(batch_size=16, batch_dice=True)) == {
        "batch_size": 16, "batch_dice": True, "patch_size": [32, 32, 32], "architecture": {"n": 4}}


def test_source_model_record_takes_hashes_from_the_verified_lock(tmp_path: Path) -> None:
    from bids_cl.engine.lockfile import read_lock_file
    from bids_cl.engine.models import resolve_model
    from bids_cl.train.run import source_model_record

    model = _locked_model(tmp_path / "model")
    record = source_model_record(resolve_model(model))
    lock = read_lock_file(model)["files"]
    assert record["trust"] == "lock" and record["name"] == "model"
    checkpoint = "fold_0/checkpoint_final.pth"
    assert record["checkpoints_sha256"] == {checkpoint: lock[checkpoint]}

    demo = source_model_record(resolve_model("demo"))
    assert demo["name"] == "demo" and demo["trust"] == "lock"
    assert set(demo["checkpoints_sha256"]) == {"fold_0/checkpoint_final.pth"}


def test_postprocessing_is_chosen_by_pooled_lesion_f1() -> None:
    from bids_cl.train.tune import choose_setting, pooled_counts

    truth = np.zeros((20, 20, 20), np.uint8)
    truth[3:6, 3:6, 3:6] = 1
    probability = np.zeros(truth.shape, np.float32)
    probability[3:6, 3:6, 3:6] = 0.45  # the true lesion, under-confident: lost at nnU-Net's 0.5
    probability[12:15, 12:15, 12:15] = 0.35  # a false positive, less confident still
    probability[17, 17, 17] = 0.9  # a confident one-voxel speck: only a size filter removes it
    voxel_ul = 8.0  # 2 mm voxels: sizes are volumes, turned into voxels as the engine does
    counts = pooled_counts([(probability, truth, voxel_ul)] * 2, [0.3, 0.4, 0.5], [0.0, 16.0])
    assert (counts[(0.3, 0.0)].tp, counts[(0.3, 0.0)].fp, counts[(0.3, 0.0)].fn) == (2, 4, 0)
    assert (counts[(0.4, 0.0)].tp, counts[(0.4, 0.0)].fp, counts[(0.4, 0.0)].fn) == (2, 2, 0)
    assert (counts[(0.4, 16.0)].tp, counts[(0.4, 16.0)].fp, counts[(0.4, 16.0)].fn) == (2, 0, 0)
    assert (counts[(0.5, 16.0)].tp, counts[(0.5, 16.0)].fp, counts[(0.5, 16.0)].fn) == (0, 0, 2)
    assert choose_setting({k: float(c.f1()) for k, c in counts.items()}) == (0.4, 16.0)
    # equal F1: the threshold nearest nnU-Net's 0.5 (then the lower one), then the smallest size
    assert choose_setting({(0.3, 0.0): 0.8, (0.45, 8.0): 0.8, (0.45, 4.0): 0.8, (0.55, 0.0): 0.8,
                           (0.7, 0.0): 0.5}) == (0.45, 4.0)




# ---------------------------------------------------------------- checkpoint trust (issue 18)

class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for code run from a malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 (pickle protocol)
        return (open, (str(self.marker), "w"))


def _nnunet_checkpoint(path: Path, logged: object) -> dict:
    """A checkpoint shaped like nnU-Net's own (optimizer state, numpy values in the training log)."""
    import torch

    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5])}
    ckpt = {"network_weights": weights, "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01}]},
            "grad_scaler_state": None, "logging": {"ema_fg_dice": [np.float32(0.5), logged]},
            "_best_ema": np.float32(0.5), "current_epoch": 3, "trainer_name": "BidsClTrainer",
            "init_args": {"configuration": "3d_fullres", "fold": 0, "device": torch.device("cpu")},
            "inference_allowed_mirroring_axes": (0, 1, 2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def test_export_reads_nnunets_checkpoint_safely_and_writes_a_plain_one(tmp_path: Path) -> None:
    import torch

    from bids_cl.train.export import slim_checkpoint
    from bids_cl.train.trainers import BidsClTrainer

    src = tmp_path / "fold_0" / "checkpoint_final.pth"
    original = _nnunet_checkpoint(src, np.float64(0.25))
    dst = tmp_path / "out" / "checkpoint_final.pth"
    assert slim_checkpoint(src, dst, trainer_class=BidsClTrainer)["trainer_name"] == "nnUNetTrainer"
    slim = torch.load(dst, weights_only=True)  # no allow-list needed any more
    assert slim["logging"]["ema_fg_dice"] == [0.5, 0.25] and type(slim["_best_ema"]) is float
    assert slim["optimizer_state"] is None
    assert all(torch.equal(slim["network_weights"][k], original["network_weights"][k]) for k in ("w", "b"))

    marker = tmp_path / "payload_ran"
    _nnunet_checkpoint(src, _Payload(marker))
    with pytest.raises(BidsClError) as err:
        slim_checkpoint(src, tmp_path / "evil" / "checkpoint_final.pth", trainer_class=BidsClTrainer)
    assert err.value.code == EXIT_BAD_DATA and not marker.exists()
    assert not (tmp_path / "evil").exists()


def test_fine_tune_start_weights_are_read_safely(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from bids_cl.engine.models import ResolvedModel
    from bids_cl.train.run import _load_init_weights

    marker = tmp_path / "payload_ran"
    model = tmp_path / "model"
    _nnunet_checkpoint(model / "fold_0" / "checkpoint_final.pth", _Payload(marker))
    source = ResolvedModel("evil", model, model, "unverified source", None)
    loaded: list[dict] = []
    trainer = SimpleNamespace(network=SimpleNamespace(load_state_dict=loaded.append))
    with pytest.raises(BidsClError) as err:
        _load_init_weights(trainer, source, 0)
    assert err.value.code == EXIT_BAD_DATA and not marker.exists() and loaded == []
    _nnunet_checkpoint(model / "fold_0" / "checkpoint_final.pth", np.float32(0.1))  # nnU-Net's own kind
    _load_init_weights(trainer, source, 0)
    assert set(loaded[0]) == {"w", "b"}

"""Skull stripping strategies on Colin27 (Debian mricron-data) and on an MP2RAGE phantom.

Images are downsampled (2-4 mm) so the whole file runs in well under a minute on two shared cores.
Full-resolution figures come from benchmarks/preproc.py and are recorded in docs/preprocessing.md.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.engine import cli as models_cli
from bids_cl.engine import registry
from bids_cl.engine import testing as T
from bids_cl.errors import BidsClError
from bids_cl.preproc import skull_strip
from bids_cl.preproc import skullstrip as S
from bids_cl.preproc._images import dice, downsample

MRICRON = Path("/usr/share/mricron/templates")
needs_colin = pytest.mark.skipif(not (MRICRON / "ch2.nii.gz").is_file(),
                                 reason="needs Debian mricron-data (apt-get install mricron-data)")


def _moved(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Same voxels, affine composed with a 10 degree / 15 mm rigid motion (Colin27 is already in MNI
    space, which would flatter template-based methods)."""
    angle = np.deg2rad(10.0)
    rigid = np.eye(4)
    rigid[1:3, 1:3] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    rigid[:3, 3] = [5.0, -12.0, 8.0]
    return nib.Nifti1Image(np.asanyarray(img.dataobj).astype(np.float32), rigid @ img.affine)


@pytest.fixture(scope="module")
def colin():
    """(head, reference brain mask) at 2 mm, moved."""
    if not (MRICRON / "ch2.nii.gz").is_file():
        pytest.skip("needs Debian mricron-data")
    head = _moved(nib.load(str(MRICRON / "ch2.nii.gz")))
    ref = _moved(nib.load(str(MRICRON / "ch2bet.nii.gz")))
    head2, ref2 = downsample(head, 2.0), downsample(ref, 2.0, order=0)
    return head2, np.asanyarray(ref2.dataobj) > 0


@pytest.fixture()
def no_synthstrip(monkeypatch, tmp_path):
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "no_freesurfer"))
    monkeypatch.setenv("BIDS_CL_HOME", str(tmp_path / "empty_bids_cl_home"))  # nothing installed either


@pytest.fixture()
def home(monkeypatch, tmp_path):
    """An empty $BIDS_CL_HOME and no FreeSurfer: SynthStrip only where a test puts it."""
    monkeypatch.setenv("BIDS_CL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FREESURFER_HOME", raising=False)
    return tmp_path / "home"


def _check_result(res, img) -> np.ndarray:
    """Contract: same grid and header as the input, uint8 0/1 mask, background exactly 0."""
    mask = np.asanyarray(res.mask.dataobj)
    brain = np.asanyarray(res.brain.dataobj)
    assert res.mask.shape == res.brain.shape == img.shape
    assert np.allclose(res.mask.affine, img.affine) and np.allclose(res.brain.affine, img.affine)
    assert res.mask.get_data_dtype() == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert res.brain.get_data_dtype() == np.float32
    assert not brain[mask == 0].any()
    assert np.array_equal(brain[mask == 1], img.get_fdata(dtype=np.float32)[mask == 1])
    assert res.strategy in S.STRATEGIES and res.strategy != "auto" and res.detail
    return mask > 0


@needs_colin
def test_auto_without_weights_runs_deepbet(colin, no_synthstrip):
    head, ref = colin
    res = skull_strip(head)
    mask = _check_result(res, head)
    assert res.strategy == "deepbet" and "deepbet" in res.detail
    assert any("domain shift" in w for w in res.warnings)
    assert dice(mask, ref) > 0.88


@needs_colin
def test_deepbet_respects_orientation(colin, no_synthstrip):
    """A flipped/permuted storage order (LIA, like SynthStrip's conformed space) gives the same brain."""
    head, ref = colin
    ornt = nib.orientations.axcodes2ornt(("L", "I", "A"))
    lia = head.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(head.affine), ornt))
    res = skull_strip(lia, strategy="deepbet")
    mask = _check_result(res, lia)
    back = nib.Nifti1Image(mask.astype(np.uint8), lia.affine).as_reoriented(
        nib.orientations.ornt_transform(ornt, nib.io_orientation(head.affine)))
    assert np.allclose(back.affine, head.affine)
    assert dice(np.asanyarray(back.dataobj), ref) > 0.88


@needs_colin
def test_ants_template_based(colin):
    head, ref = colin
    small = downsample(head, 4.0)
    ref4 = np.asanyarray(downsample(nib.Nifti1Image(ref.astype(np.uint8), head.affine), 4.0, order=0)
                         .dataobj) > 0
    res = skull_strip(small, strategy="ants", nthreads=1)
    mask = _check_result(res, small)
    assert res.strategy == "ants" and "4 mm" in res.detail
    assert dice(mask, ref4) > 0.85


@needs_colin
def test_none_accepts_a_stripped_image(colin):
    head, ref = colin
    stripped = nib.Nifti1Image(np.where(ref, head.get_fdata(dtype=np.float32), 0), head.affine)
    res = skull_strip(stripped, strategy="none")
    mask = _check_result(res, stripped)
    assert dice(mask, ref) > 0.99 and res.warnings == []


@needs_colin
def test_none_accepts_constant_negative_background(colin):
    """SynthStrip writes min(0, image minimum) outside the brain: a UNI in [-0.5, 0.5] gets -0.5."""
    head, ref = colin
    data = head.get_fdata(dtype=np.float32) / 255.0 - 0.5
    stripped = nib.Nifti1Image(np.where(ref, data, -0.5).astype(np.float32), head.affine)
    res = skull_strip(stripped, strategy="none")
    mask = np.asanyarray(res.mask.dataobj) > 0
    assert dice(mask, ref) > 0.98 and "background value -0.5" in res.detail
    assert not np.asanyarray(res.brain.dataobj)[~mask].any()


@needs_colin
def test_none_rejects_a_head(colin):
    head, _ = colin
    with pytest.raises(BidsClError) as err:
        skull_strip(head, strategy="none")
    assert err.value.code == 65 and "head" in str(err.value)


@needs_colin
def test_none_rejects_salt_and_pepper_background(colin):
    head, ref = colin
    rng = np.random.default_rng(0)
    data = np.where(ref, head.get_fdata(dtype=np.float32), rng.uniform(0, 255, head.shape))
    with pytest.raises(BidsClError) as err:
        skull_strip(nib.Nifti1Image(data.astype(np.float32), head.affine), strategy="none")
    assert err.value.code == 65 and "border is non-zero" in str(err.value)


def test_inv2_mask_is_resampled_to_the_uni_grid(monkeypatch, no_synthstrip):
    """INV2 on another grid: the mask follows world coordinates, not voxel indices."""
    uni_aff = np.diag([2.0, 2.0, 2.0, 1.0])
    uni = nib.Nifti1Image(np.random.default_rng(1).uniform(1, 10, (20, 20, 20)).astype(np.float32), uni_aff)
    inv2_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    inv2_aff[:3, 3] = [4.0, 4.0, 4.0]  # 1 mm grid starting 4 mm further
    inv2 = nib.Nifti1Image(np.ones((30, 30, 30), np.float32), inv2_aff)
    cube = np.zeros((30, 30, 30), bool)
    cube[6:26, 6:26, 6:26] = True  # world 10..29 mm

    monkeypatch.setattr(S, "deepbet_mask", lambda img, **kw: cube)
    res = skull_strip(uni, strategy="auto", inv2_img=inv2)
    assert res.strategy == "inv2" and "resampled" in res.detail
    mask = np.asanyarray(res.mask.dataobj) > 0
    expected = np.zeros(uni.shape, bool)
    expected[5:15, 5:15, 5:15] = True  # world 10..28 mm on the 2 mm grid
    assert dice(mask, expected) > 0.95


def test_argument_errors(tmp_path):
    img = nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(BidsClError) as err:
        skull_strip(img, strategy="bet")
    assert err.value.code == 64
    with pytest.raises(BidsClError) as err:
        skull_strip(img, strategy="inv2")
    assert err.value.code == 66
    with pytest.raises(BidsClError) as err:
        skull_strip(tmp_path / "missing.nii.gz")
    assert err.value.code == 66
    with pytest.raises(BidsClError) as err:
        skull_strip(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), strategy="none")
    assert err.value.code == 65
    with pytest.raises(BidsClError) as err:  # a 4th axis of length 1 is fine; an empty image is not
        skull_strip(nib.Nifti1Image(np.zeros((8, 8, 8, 1), np.float32), np.eye(4)), strategy="none")
    assert err.value.code == 65 and "empty" in str(err.value)


def test_synthstrip_without_weights_says_where_to_put_them(tmp_path, home):
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    with pytest.raises(BidsClError) as err:
        skull_strip(img, strategy="synthstrip")
    assert err.value.code == 66
    assert "synthstrip.1.pt" in str(err.value) and "FREESURFER_HOME" in str(err.value)
    assert "bids_cl-models install synthstrip" in str(err.value)
    for strategy in ("synthstrip", "auto"):  # an explicit path that is wrong is never skipped silently
        with pytest.raises(BidsClError) as err:
            skull_strip(img, strategy=strategy, synthstrip_model=tmp_path / "nope.pt")
        assert err.value.code == 66 and "nope.pt" in str(err.value)


@needs_colin
def test_synthstrip_pipeline_with_stand_in_weights(colin, tmp_path, monkeypatch):
    """The real weights are FreeSurfer's to distribute. With a randomly initialised checkpoint and the
    network replaced by a stand-in distance map (-2 mm inside tissue), everything around the
    network (loading, conforming to 1 mm LIA, resampling back, border threshold) must give a mask on the
    input grid that covers the stand-in's region. auto must pick SynthStrip when the weights exist."""
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("nipreps.synthstrip.model")
    head, ref = colin
    stripped = nib.Nifti1Image(np.where(ref, head.get_fdata(dtype=np.float32), 0), head.affine)
    fs_home = tmp_path / "fs"
    T.write_synthstrip_checkpoint(fs_home / "models" / "synthstrip.1.pt")
    monkeypatch.setenv("FREESURFER_HOME", str(fs_home))
    monkeypatch.setenv("BIDS_CL_HOME", str(tmp_path / "home"))
    # Conforming overshoots (spline), so the scaled background is a constant > 0: the most common
    # value, i.e. the median here. Tissue above it is "inside" (distance -2 mm).
    monkeypatch.setattr(model_mod.StripModel, "forward",
                        lambda self, x: torch.where(x > x.median() + 0.05, -2.0, 5.0))
    res = skull_strip(stripped)
    mask = _check_result(res, stripped)
    assert res.strategy == "synthstrip" and "SynthStrip" in res.detail and res.warnings == []
    assert dice(mask, ref) > 0.95


def test_mp2rage_phantom_inv2(no_synthstrip):
    """bids_cl-synth MP2RAGE phantom (tiny, 2 mm): the UNI's salt-and-pepper background is rejected
    by 'none'; auto with INV2 masks the UNI with deepbet-on-INV2 close to the true brain mask."""
    synth = pytest.importorskip("bids_cl.synth")
    if not hasattr(synth, "simulate_subject"):
        pytest.skip("bids_cl.synth has no simulate_subject yet")
    options = synth.SynthOptions(participants=1, seed=3, sequence="mp2rage", size="tiny")
    phantom = synth.simulate_subject(options, synth.plan_participants(options)[0]).images[0]
    uni = nib.Nifti1Image(phantom.images[phantom.target], phantom.affine)
    inv2 = nib.Nifti1Image(phantom.images[next(k for k in phantom.images if "inv-2" in k)], phantom.affine)
    with pytest.raises(BidsClError) as err:
        skull_strip(uni, strategy="none")
    assert err.value.code == 65
    res = skull_strip(uni, inv2_img=inv2)
    mask = _check_result(res, uni)
    assert res.strategy == "inv2" and "INV2" in res.detail
    assert dice(mask, phantom.brain_mask) > 0.93


# --- SynthStrip weights: install, lock, lookup, trust ------------------------------------------------


class _Payload:
    """Unpickling this creates ``marker`` (a stand-in for code run from a malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204 (pickle protocol)
        return (open, (str(self.marker), "w"))


def test_install_synthstrip_from_file_lock_list_and_lookup_order(home, tmp_path, monkeypatch, capsys):
    weights = T.write_synthstrip_checkpoint(tmp_path / "dl" / "synthstrip.1.pt", seed=1)
    assert S.find_synthstrip_weights() is None
    assert models_cli.main(["install", "synthstrip", "--from-file", str(weights)]) == 0
    installed = home / "models" / "synthstrip" / "synthstrip.1.pt"
    assert installed.read_bytes() == weights.read_bytes()
    from bids_cl.engine.lockfile import read_lock_file, sha256_file, verify_lock_file

    lock = read_lock_file(installed.parent)
    assert verify_lock_file(installed.parent) == []
    assert lock["files"] == {"synthstrip.1.pt": sha256_file(weights)}
    assert lock["source"]["origin"] == "unverified source"
    capsys.readouterr()
    assert models_cli.main(["list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("synthstrip "))
    assert "installed" in row
    assert models_cli.main(["verify"]) == 0 and "synthstrip: OK" in capsys.readouterr().out
    assert models_cli.main(["install", "synthstrip", "--from-file", str(weights)]) == 73  # already there
    from bids_cl.engine.models import load_model

    with pytest.raises(BidsClError) as err:
        load_model("synthstrip")
    assert err.value.code == 64  # skull-stripping weights are no segmentation model

    # lookup order: --synthstrip-model, then the installed copy, then $FREESURFER_HOME
    fs = T.write_synthstrip_checkpoint(tmp_path / "fs" / "models" / "synthstrip.1.pt", seed=2)
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "fs"))
    assert S.find_synthstrip_weights() == installed
    assert S.find_synthstrip_weights(weights) == weights
    import shutil

    shutil.rmtree(installed.parent)
    assert S.find_synthstrip_weights() == fs


def test_install_synthstrip_without_a_file_copies_freesurfers_or_says_where_to_get_it(
        home, tmp_path, monkeypatch, capsys):
    assert models_cli.main(["install", "synthstrip"]) == 66
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "FreeSurfer >= 7.3" in err and "freesurfer/synthstrip" in err
    assert "--from-file" in err and not (home / "models" / "synthstrip").exists()
    T.write_synthstrip_checkpoint(tmp_path / "fs" / "models" / "synthstrip.1.pt")
    monkeypatch.setenv("FREESURFER_HOME", str(tmp_path / "fs"))
    capsys.readouterr()
    assert models_cli.main(["list"]) == 0
    assert "in FreeSurfer" in next(line for line in capsys.readouterr().out.splitlines()
                                   if line.startswith("synthstrip "))
    assert models_cli.main(["install", "synthstrip"]) == 0
    from bids_cl.engine.lockfile import read_lock_file

    assert read_lock_file(home / "models" / "synthstrip")["source"]["installed_from"] == \
        "FreeSurfer installation"


def test_tampered_or_foreign_synthstrip_weights_are_refused(home, tmp_path):
    weights = T.write_synthstrip_checkpoint(tmp_path / "synthstrip.1.pt")
    assert models_cli.main(["install", "synthstrip", "--from-file", str(weights)]) == 0
    installed = registry.installed_synthstrip()
    with open(installed, "ab") as fh:
        fh.write(b"\0")
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    for strategy in ("auto", "synthstrip"):  # never a silent fall-back to deepbet
        with pytest.raises(BidsClError) as err:
            skull_strip(img, strategy=strategy)
        assert err.value.code == 65 and "changed file" in str(err.value)
    assert models_cli.main(["verify", "synthstrip"]) == 65

    import torch

    other = tmp_path / "not_synthstrip.pt"
    torch.save({"model_state_dict": {"conv.weight": torch.zeros(1)}}, other)
    assert models_cli.main(["install", "synthstrip", "--from-file", str(other), "--force"]) == 65
    assert installed.is_file()  # the refused file replaced nothing


def test_crafted_synthstrip_checkpoint_is_refused_without_side_effect(home, tmp_path):
    import torch

    marker = tmp_path / "payload_ran"
    evil = tmp_path / "synthstrip.1.pt"
    state = torch.load(T.write_synthstrip_checkpoint(tmp_path / "ok.pt"), weights_only=True)
    torch.save({**state, "epoch": _Payload(marker)}, evil)
    img = nib.Nifti1Image(np.ones((16, 16, 16), np.float32), np.eye(4))
    for strategy in ("auto", "synthstrip"):
        with pytest.raises(BidsClError) as err:
            skull_strip(img, strategy=strategy, synthstrip_model=evil)
        assert err.value.code == 65 and "allow-list" in str(err.value)
        assert not marker.exists()
    assert models_cli.main(["install", "synthstrip", "--from-file", str(evil)]) == 65
    assert not marker.exists() and not (home / "models" / "synthstrip").exists()


@pytest.mark.slow
def test_participant_run_uses_the_installed_synthstrip(home, tmp_path):
    """The whole chain: install from file, lock verified, ``--skull-strip auto`` picks SynthStrip, and the
    summary, the brain-mask sidecar and the participant report all say so."""
    import json
    import os
    import subprocess
    import sys

    from bids_cl.synth import generate_dataset

    bids = generate_dataset(tmp_path / "bids", participants=1, sessions=1, seed=5, size="tiny",
                            sequence="mprage", lesion_free_fraction=0.0)
    weights = T.write_synthstrip_checkpoint(tmp_path / "synthstrip.1.pt", intensity_threshold=0.2)
    assert models_cli.main(["install", "synthstrip", "--from-file", str(weights)]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "BIDS_CL_HOME": str(home), "NIPYPE_NO_ET": "1",
           "TEMPLATEFLOW_HOME": str(tmp_path / "tf")}
    env.pop("FREESURFER_HOME", None)
    proc = subprocess.run([sys.executable, "-m", "bids_cl", str(bids), str(out), "participant",
                           "--model", "demo", "-w", str(tmp_path / "work"), "--nprocs", "1",
                           "--omp-nthreads", "1", "--device", "cpu", "--skip-bids-validation",
                           "--output-spaces"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(out.rglob("*_label-CL_desc-summary_stats.json"))
    masks = sorted(out.rglob("*_desc-brain_mask.json"))
    assert summaries and len(summaries) == len(masks)
    for summary, mask in zip(summaries, masks, strict=True):
        assert json.loads(summary.read_text())["SkullStripStrategy"] == "synthstrip"
        assert json.loads(mask.read_text())["SkullStripStrategy"] == "synthstrip"
    report = next(out.glob("sub-*.html")).read_text()
    assert "synthstrip" in report and "deepbet" not in report

"""Templates: nilearn seeding into an offline TemplateFlow home, local-only lookup, the fetch command."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bids_cl.errors import BidsClError
from bids_cl.preproc import templates as T


@pytest.fixture()
def no_network(monkeypatch):
    """Any connection attempt fails at once: proves a code path never reaches for the network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("tf")
    T.seed_nilearn_template(home)
    return home


@pytest.fixture()
def tf_home(seeded_home, monkeypatch) -> Path:
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(seeded_home))
    return seeded_home


def test_default_space_is_seeded_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path / "tf"))
    tpl = T.get_template()
    assert tpl.space == "MNI152NLin2009aSym" and tpl.resolution == 1 and tpl.skull_stripped
    assert tpl.source.startswith("nilearn ")
    folder = tmp_path / "tf" / "tpl-MNI152NLin2009aSym"
    assert Path(tpl.t1w) == folder / "tpl-MNI152NLin2009aSym_res-01_desc-brain_T1w.nii.gz"
    assert Path(tpl.mask) == folder / "tpl-MNI152NLin2009aSym_res-01_desc-brain_mask.nii.gz"
    # nothing half-written, no placeholders, no temporary files left behind
    assert all(p.stat().st_size > 0 for p in folder.iterdir())
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    prov = json.loads((folder / T.PROVENANCE_NAME).read_text())
    assert prov["Source"].startswith("nilearn ") and Path(tpl.t1w).name in prov["Files"]


def test_seeded_images(tf_home):
    for res, shape in ((1, (197, 233, 189)), (2, (99, 117, 95))):
        tpl = T.get_template("MNI152NLin2009aSym", resolution=res)
        t1, mask = nib.load(tpl.t1w), nib.load(tpl.mask)
        assert t1.shape == mask.shape == shape
        assert np.allclose(t1.affine, mask.affine) and np.allclose(np.diag(t1.affine)[:3], res)
        m = np.asanyarray(mask.dataobj)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(m)) == {0, 1}
        data = t1.get_fdata()
        assert not data[m == 0].any()  # a desc-brain image: exactly zero outside the mask
        assert 1.4e6 < m.sum() * res**3 < 2.2e6  # brain volume in mm3


def test_second_call_does_not_rewrite(tf_home):
    tpl = T.get_template()
    before = Path(tpl.t1w).stat().st_mtime_ns
    t0 = time.perf_counter()
    again = T.get_template()
    assert time.perf_counter() - t0 < 1.0
    assert again == tpl and Path(tpl.t1w).stat().st_mtime_ns == before


def test_missing_space_fails_fast_with_prefetch_command(tf_home, no_network):
    t0 = time.perf_counter()
    with pytest.raises(BidsClError) as err:
        T.check_templates(["MNI152NLin2009aSym", "MNI152NLin6Asym"])
    assert time.perf_counter() - t0 < 5
    assert err.value.code == 66
    msg = str(err.value)
    assert "MNI152NLin6Asym" in msg and "MNI152NLin2009aSym," not in msg
    assert f"bids_cl-fetch-templates --tf-dir {tf_home} MNI152NLin6Asym" in msg


def test_placeholders_and_error_pages_are_not_templates(tmp_path, monkeypatch, no_network):
    """TemplateFlow's skeleton has 0-byte files; a failed S3 fetch may leave an XML error page."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    folder = tmp_path / "tpl-MNI152NLin6Asym"
    folder.mkdir()
    (folder / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz").write_bytes(b"")
    (folder / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz").write_text("<?xml version='1.0'?>")
    assert T.find_template("MNI152NLin6Asym", resolution=2) is None
    with pytest.raises(BidsClError) as err:
        T.get_template("MNI152NLin6Asym", resolution=2)
    assert err.value.code == 66


def test_head_template_with_mask_is_accepted(tmp_path, monkeypatch):
    """Spaces without a desc-brain T1w (MNI152NLin6Asym) use the head T1w plus the brain mask."""
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    folder = tmp_path / "tpl-MNI152NLin6Asym"
    folder.mkdir()
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4) * 2)
    nib.save(img, folder / "tpl-MNI152NLin6Asym_res-02_T1w.nii.gz")
    nib.save(img, folder / "tpl-MNI152NLin6Asym_res-02_desc-brain_mask.nii.gz")
    tpl = T.get_template("MNI152NLin6Asym:res-2")
    assert tpl.resolution == 2 and not tpl.skull_stripped and tpl.source == "templateflow"
    assert tpl.t1w.endswith("res-02_T1w.nii.gz")


def test_parse_space():
    assert T.parse_space("MNI152NLin2009aSym") == ("MNI152NLin2009aSym", None, 1)
    assert T.parse_space("MNIPediatricAsym:cohort-2:res-2") == ("MNIPediatricAsym", "2", 2)
    with pytest.raises(BidsClError) as err:
        T.parse_space("MNI:foo")
    assert err.value.code == 64


def test_unwritable_home_is_exit_73(tmp_path, monkeypatch):
    """A read-only TemplateFlow home (e.g. baked into a container) without the seed: a clear exit 73."""
    import bids_cl.utils.io as io

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(io, "atomic_save_nifti", read_only)
    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(tmp_path))
    with pytest.raises(BidsClError) as err:
        T.get_template()
    assert err.value.code == 73 and "bids_cl-fetch-templates --tf-dir" in str(err.value)


def test_fetch_command_seeds_default_offline(tmp_path, no_network, capsys):
    assert T.main(["--tf-dir", str(tmp_path / "tf"), "--resolution", "2"]) == 0
    out = capsys.readouterr().out
    assert "export TEMPLATEFLOW_HOME=" in out
    assert T.find_template(resolution=2, home=tmp_path / "tf") is not None


def test_fetch_command_reports_download_failure(tmp_path, monkeypatch, capsys):
    def fail(space, res, home):
        raise OSError("no route to host")

    monkeypatch.setattr(T, "_fetch_from_templateflow", fail)
    assert T.main(["--tf-dir", str(tmp_path), "MNI152NLin6Asym"]) != 0
    assert "bids_cl-fetch-templates: error:" in capsys.readouterr().err


def test_entry_point_declared():
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert 'bids_cl-fetch-templates = "bids_cl.preproc.templates:main"' in text

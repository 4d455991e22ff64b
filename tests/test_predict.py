"""`siimcovid predict`: a bundle's models on new data (siimcovid/predict/).

Fast tests: what the source is, the sample submission written from prepared images, the
settings, the record that decides what a re-run reuses. Slow tests (a tiny trained run, exported
with `siimcovid export`): the submission on the run's SIIM root equals the run's own byte for byte,
a corrupt bundle stops before any work, a loose folder of DICOMs, a resumed re-run.
"""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from siimcovid.config import ConfigError
from siimcovid.data.siim import read_sample_submission
from siimcovid.predict.members import member_tta
from siimcovid.predict.record import RECORD, Record, images_id
from siimcovid.predict.source import loader_workers, pool_workers, prepare_settings, sample_from_meta, source_layout
from siimcovid.stages import stage_config
from siimcovid.tables import SAMPLE, SAMPLE_SUBMISSION
from siimcovid.utils import SiimError


# ----------------------------------------------------------------------------- fast
def test_a_siim_root_is_told_from_a_folder_of_dicoms_and_from_one_file(tmp_path):
    root = tmp_path / "siim"
    (root / "test").mkdir(parents=True)
    (root / SAMPLE_SUBMISSION).write_text("id,PredictionString\n")
    assert source_layout(root) == "siim"
    (root / SAMPLE_SUBMISSION).unlink()  # a test/ folder alone is just a tree of DICOMs
    assert source_layout(root) == "folder"
    one = tmp_path / "x.dcm"
    one.write_bytes(b"")
    assert source_layout(one) == "folder"
    with pytest.raises(SiimError, match="source not found"):
        source_layout(tmp_path / "missing")


def test_the_sample_of_a_folder_source_lists_every_prepared_study_then_every_image(tmp_path):
    test = pd.DataFrame({"image_id": ["i1", "i2", "i3"], "study_id": ["s2", "s1", "s2"]})
    path = SAMPLE.write(sample_from_meta(test), tmp_path / SAMPLE_SUBMISSION)
    studies, images = read_sample_submission(path)  # the parser fuse reads it with
    assert studies == ["s2", "s1"] and images == ["i1", "i2", "i3"]


def test_prepare_takes_the_bundles_conversion_settings_and_only_the_test_split(tmp_path):
    conversion = {"sizes": [64, 128], "ext": "jpg", "png_level": 0, "n_folds": 5}
    settings = prepare_settings(conversion, tmp_path / "src", "siim", tmp_path / "out" / "prepared", None, "skip")
    cfg = stage_config("prepare", None, settings)  # typed and checked as on the command line
    assert (cfg.sizes, cfg.ext, cfg.splits, cfg.layout, cfg.on_error) == ([64, 128], "jpg", ["test"], "siim", "skip")
    assert cfg.workers == 0 and "n_folds" not in settings  # every core; folds mean nothing for test images
    with pytest.raises(SiimError, match=r"lack \['ext'\]"):
        prepare_settings({"sizes": [64], "png_level": 0}, tmp_path, "siim", tmp_path / "p", None, "skip")


def test_workers_map_to_pools_and_loaders():
    assert (pool_workers(None), pool_workers(0), pool_workers(3)) == (0, 1, 3)  # prepare / fuse: 0 = every core
    assert loader_workers(0) == 0 and loader_workers(2) == 2 and 1 <= loader_workers(None) <= 8


def test_predict_settings_are_typed_and_registered():
    cfg = stage_config("predict", None, {"bundle": "b", "source": "s", "out": "o", "tta": "false", "batch": 4})
    assert cfg.tta is False and cfg.batch == 4 and cfg.half is True and cfg.on_error == "skip" and cfg.device is None
    with pytest.raises(ConfigError, match="predict setting batch=0"):
        stage_config("predict", None, {"batch": 0})
    with pytest.raises(ConfigError, match="unknown predict setting 'bundles'"):
        stage_config("predict", None, {"bundles": "b"})


def test_predict_needs_a_bundle_a_source_and_an_out():
    from siimcovid.cli import call

    with pytest.raises(SiimError, match="predict needs bundle="):
        call("predict", source="s", out="o")


def test_tta_null_keeps_each_members_own_and_a_bool_sets_every_member():
    det = SimpleNamespace(kind="detect", settings={"tta": True})
    cls = SimpleNamespace(kind="classify", settings={"tta": "hflip"})
    assert member_tta(det, None) is True and member_tta(cls, None) == "hflip"
    assert member_tta(det, False) is False and member_tta(cls, False) == "none" and member_tta(cls, True) == "hflip"


def test_the_record_reuses_a_table_only_for_the_same_bundle_images_and_tta(tmp_path):
    table = tmp_path / "detect" / "a" / "pred_test.csv"
    table.parent.mkdir(parents=True)
    table.write_text("x")
    entry = {"images": images_id(["i1", "i2"]), "tta": False, "half": False}
    record = Record(tmp_path, "b1", "sha-1", {})
    assert not record.reusable("detect/a", entry, table)
    record.done("detect/a", entry)
    again = Record(tmp_path, "b1", "sha-1", {})  # a re-run reads predict.yaml
    assert again.reusable("detect/a", entry, table)
    assert not again.reusable("detect/a", {**entry, "tta": True}, table)
    assert not again.reusable("detect/a", {**entry, "images": images_id(["i1"])}, table)
    other = Record(tmp_path, "b2", "sha-2", {})  # another bundle: its tables go
    assert not table.exists() and not other.reusable("detect/a", entry, table)
    assert (tmp_path / RECORD).is_file()

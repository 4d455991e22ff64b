"""A bundle's predict sees the pixels its members trained on: prepare makes a folder's smaller sizes from its largest,
so a member trained at 64 px on a folder prepared at 64 and 128 px saw 64 px images resized from 128; the bundle
records resize_from and predict's prepare makes them the same way (prepare resize_from=, export prepare_settings)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from siimcovid.config import load_config
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.utils import SiimError


def prepare_at(synth_root, out: Path, **settings) -> Prepared:
    cfg = {"data": str(synth_root), "name": out.name, "out": str(out), "n_folds": 3, "workers": 0,
           "splits": ["test"], "data_yaml_dir": str(out.parent / "data_yaml")}  # fmt: skip
    return Prepared(prepare(load_config("prepare", {**cfg, **settings})))


def pixels(prep: Prepared, size: int) -> dict[str, np.ndarray]:
    return {i: cv2.imread(str(prep.image_path(i, "test", size)), cv2.IMREAD_GRAYSCALE) for i in prep.split("test").image_id}


def test_resize_from_writes_only_sizes_with_the_pixels_of_the_larger_folder(synth_root, prepared, tmp_path):
    trained_on = pixels(Prepared(prepared), 64)  # the conftest folder: sizes 64 and 128
    direct = pixels(prepare_at(synth_root, tmp_path / "direct", sizes=[64]), 64)
    cascaded = prepare_at(synth_root, tmp_path / "cascaded", sizes=[64], resize_from=128)
    assert not (tmp_path / "cascaded" / "128").exists()  # made, not written
    same = pixels(cascaded, 64)
    assert all(np.array_equal(same[i], trained_on[i]) for i in trained_on)
    assert any(not np.array_equal(direct[i], trained_on[i]) for i in trained_on)  # why it matters: else other pixels
    with pytest.raises(SiimError, match="resize_from=32 is smaller than the largest of sizes"):
        prepare_at(synth_root, tmp_path / "bad", sizes=[64], resize_from=32)


def test_export_records_the_size_a_members_images_were_resized_from(prepared, tmp_path):
    from siimcovid.bundle.export import prepare_settings
    from siimcovid.bundle.files import PREPARE_FILE
    from siimcovid.predict.source import prepare_settings as predict_settings

    recorded = prepare_settings([Path(prepared)], [64])
    assert recorded["sizes"] == [64] and recorded["resize_from"] == 128
    assert "resize_from" not in prepare_settings([Path(prepared)], [128])  # the largest: nothing to record
    assert set(recorded) <= set(PREPARE_FILE.names)
    settings = predict_settings(recorded, tmp_path / "new", "folder", tmp_path / "out", 0, "raise")
    assert settings["resize_from"] == 128 and settings["sizes"] == [64]
    older = {k: v for k, v in recorded.items() if k != "resize_from"}  # a bundle of the release before
    assert predict_settings(older, tmp_path / "new", "folder", tmp_path / "out", 0, "raise")["resize_from"] is None


def test_a_rerun_that_would_make_kept_images_from_another_size_is_refused(synth_root, tmp_path):
    prepare_at(synth_root, tmp_path / "p", sizes=[64, 128])
    with pytest.raises(SiimError, match=r"images at \[64\] px were made from 128 px .* give resize_from=128"):
        prepare_at(synth_root, tmp_path / "p", sizes=[64])
    again = prepare_at(synth_root, tmp_path / "p", sizes=[64], resize_from=128)  # the same pixels: resumed
    assert again.sizes == [64]
    with pytest.raises(SiimError, match=r"made from 128 px .* another out="):
        prepare_at(synth_root, tmp_path / "p", sizes=[64, 256])

"""family=torchvision: one fold of torchvision's Faster R-CNN (the light mobilenet arch, from scratch) trains through the
fold engine and predicts OOF and test boxes in the DETECTIONS contract, in original pixels; with crop=lung it trains on
the lung crops too and predicts each image whole and cropped, the crop's boxes back in original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_detect_crop import fake_lung_run

from siimcovid import cli
from siimcovid.data.prepared import Prepared
from siimcovid.tables import DETECTIONS
from siimcovid.utils import SiimError

TINY = ["family=torchvision", "arch=fasterrcnn_mobilenet_v3_large_fpn", "pretrained=false", "epochs=1", "imgsz=64"]
TINY += ["batch=4", "workers=0", "device=cpu"]


@pytest.mark.slow
def test_a_torchvision_fold_trains_and_predicts_in_original_pixels(prepared_small, tmp_path):
    prep = Prepared(prepared_small)
    run = cli.main(["detect", "train", f"data={prepared_small}", *TINY, f"project={tmp_path}", "name=tv", "fold=0"])
    out = cli.main(["detect", "predict", f"run={run}", "device=cpu", "tta=true", "conf=0.0001"])["tv"]
    oof, test = DETECTIONS.read(out["oof"]), DETECTIONS.read(out["test"])
    assert len(oof) and len(test)  # boxes to check: an empty table would pass every check below
    assert set(oof.image_id) <= set(prep.fold(0, "val").image_id) and (oof.fold == 0).all()
    assert set(test.image_id) <= set(prep.split("test").image_id)
    meta = prep.meta.set_index("image_id")
    for table in (oof, test):
        assert (table.x_max <= meta.loc[table.image_id, "cols"].to_numpy() + 1e-6).all()
        assert (table.y_max <= meta.loc[table.image_id, "rows"].to_numpy() + 1e-6).all()
        assert ((table.x_min < table.x_max) & (table.conf.between(0, 1))).all()


# ---------------------------------------------------------------- crop=lung (the lung run: tests/test_detect_crop.py's)
BLOCK = (40, 70, 52, 82)  # x0 y0 x1 y1 of a bright block in a 128 px prepared image, inside the fake lung window


def block_image() -> np.ndarray:
    image = np.zeros((128, 128), np.uint8)
    image[BLOCK[1] : BLOCK[3], BLOCK[0] : BLOCK[2]] = 255
    return image


def bright_box(tensor: torch.Tensor) -> list[float]:
    """The box of the pixels above half of an image tensor (3 x h x w), x0 y0 x1 y1."""
    ys, xs = torch.nonzero(tensor[0] > 0.5, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


class BrightNet:
    """Stands for a torchvision detector: one box around the bright pixels of each input image, opacity, conf 0.9."""

    def __call__(self, images):
        return [
            {"boxes": torch.tensor([bright_box(t)]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])} for t in images
        ]


@pytest.mark.parametrize("tta", [False, True])
def test_torchvision_views_map_each_views_boxes_back_to_original_pixels(prepared, tmp_path, monkeypatch, tta):
    """detect_arrays (the resize to imgsz, the tta flip) under views.detect_views: the block found on the whole image
    and on its lung crop comes back at its place in original pixels (within the resize's blur)."""
    from siimcovid import views
    from siimcovid.config import load_config
    from siimcovid.detect.torchvision_family import Detector, TorchvisionFamily, ValRun

    prep = Prepared(prepared)
    lung = fake_lung_run(tmp_path / "lung", prep)
    monkeypatch.setattr(views, "read_gray", lambda path: block_image())
    settings = {"family": "torchvision", "crop": "lung", "lung": str(lung), "view_fusion": "concat", "crop_margin": 0.0}
    family = TorchvisionFamily(load_config("detect", {**settings, "lung_conf": 0.5, "tta": tta}))
    image_id = prep.fold(0, "val").image_id.iloc[0]
    r = prep.meta.set_index("image_id").loc[image_id]
    found = family.predict_images(Detector(BrightNet(), 96, torch.device("cpu")), ValRun(prep, 128, "tv"), 0, [image_id], "train")
    assert list(found.columns) == DETECTIONS.required and (found.fold == 0).all() and (found.model == "tv").all()
    assert len(found) == 2  # the whole image's box, then the crop's (view_fusion=concat)
    expected = [BLOCK[0] * r.cols / 128, BLOCK[1] * r.rows / 128, BLOCK[2] * r.cols / 128, BLOCK[3] * r.rows / 128]
    blur = 1.5 * max(r.cols, r.rows) / 96  # a pixel and a half of the model's input, in original pixels
    for _, row in found.iterrows():
        assert row[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float) == pytest.approx(expected, abs=blur)


@pytest.mark.parametrize("fliplr", [0.0, 1.0])
def test_crop_train_items_carry_their_boxes_into_the_crop(prepared, tmp_path, monkeypatch, fliplr):
    """crop_train: a training image's crop (its own fold's out-of-fold lung window) is one more item, whose target box
    lies on the block it boxes in the crop's pixels, flipped or not."""
    from siimcovid import views
    from siimcovid.detect import torchvision_train
    from siimcovid.detect.torchvision_train import FoldImages, own_fold_windows

    prep = Prepared(prepared)
    lungs = views.LungBoxes.of_run(fake_lung_run(tmp_path / "lung", prep))
    ids = list(prep.fold(0, "train").image_id[:2])  # images of folds 1 and 2: each cropped by its own fold's lung model
    crops = own_fold_windows(prep, lungs, ids, 0.5, 0.0)
    assert sorted(crops) == sorted(ids)
    monkeypatch.setattr(views, "read_gray", lambda path: block_image())
    monkeypatch.setattr(torchvision_train, "read_labels", lambda path, side: np.array([BLOCK], dtype=np.float64))
    data = FoldImages(prep, ids, 128, 64, fliplr, 0, crops)
    assert len(data) == 2 * len(ids)
    whole, crop = data[0], data[len(ids)]
    for tensor, target in (whole, crop):
        assert target["boxes"].tolist()[0] == pytest.approx(bright_box(tensor), abs=1.0)
    area = [float((t["boxes"][0, 2] - t["boxes"][0, 0]) * (t["boxes"][0, 3] - t["boxes"][0, 1])) for _, t in (whole, crop)]
    assert area[1] > 1.5 * area[0]  # the crop (the middle 70% of each side) shows the block larger


def test_torchvision_refuses_task_lung(prepared, tmp_path):
    with pytest.raises(SiimError, match="opacity detectors only, not task=lung: the lung detector is family=yolo"):
        cli.main(["detect", "train", f"data={prepared}", *TINY, f"project={tmp_path}", "task=lung"])


@pytest.mark.slow
def test_a_torchvision_fold_trains_on_lung_crops_and_predicts_both_views(prepared_small, tmp_path, caplog):
    prep = Prepared(prepared_small)
    lung = fake_lung_run(tmp_path / "lung", prep)
    crop = ["crop=lung", f"lung={lung}"]
    with caplog.at_level("INFO", logger="siimcovid"):
        run = cli.main(["detect", "train", f"data={prepared_small}", *TINY, f"project={tmp_path}", "name=tv", "fold=0", *crop])
    n = len(prep.fold(0, "train"))
    assert f"{n} training images + {n} lung crops of them" in caplog.text
    out = cli.main(["detect", "predict", f"run={run}", "device=cpu", "tta=true", "split=oof", "conf=0.0001", *crop])
    oof = DETECTIONS.read(out["tv"]["oof"])
    assert len(oof) and set(oof.image_id) <= set(prep.fold(0, "val").image_id) and (oof.fold == 0).all()
    meta = prep.meta.set_index("image_id")
    assert (oof.x_max <= meta.loc[oof.image_id, "cols"].to_numpy() + 1e-6).all()
    assert (oof.y_max <= meta.loc[oof.image_id, "rows"].to_numpy() + 1e-6).all()
    assert ((oof.x_min >= 0) & (oof.x_min < oof.x_max) & (oof.y_min < oof.y_max)).all()

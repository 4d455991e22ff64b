"""crop=lung for the YOLO detector: its views (whole image + lung crop) at predict, the crops as extra training images,
and the refusals (no lung run, a lung run of other folds, an opacity run given as lung=).

The lung run here is written by hand (a detect.yaml of task=lung and its prediction tables): a box per image and fold,
so the tests know each window exactly. tests/test_lungs.py trains a real one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from siimcovid import cli
from siimcovid.data.prepared import Prepared
from siimcovid.detect.crops import crop_labels, yolo_labels
from siimcovid.rundir import write_run
from siimcovid.tables import DETECTIONS
from siimcovid.utils import SiimError
from siimcovid.views import LungBoxes, cut, widen

TINY = ["model=yolov5n.yaml", "pretrained=false", "epochs=1", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]


def fake_lung_run(folder: Path, prep: Prepared, shrink: float = 0.15, folds_id: str | None = None) -> Path:
    """A lung run's record and tables: every image's box is the image minus `shrink` on each side (fold f's rows for its
    own images out of fold; every fold's rows for the test images), conf 0.9, plus a weaker decoy box."""
    folder.mkdir(parents=True, exist_ok=True)
    write_run(folder / "detect.yaml", "detect", {"task": "lung"}, {"mode": "train", "folds_id": folds_id or prep.folds_id})
    rows = []
    for split, part in (("oof", prep.split("train")), ("test", prep.split("test"))):
        for r in part.itertuples():
            folds = [int(r.fold)] if split == "oof" else range(prep.n_folds)
            for f in folds:
                box = [r.cols * shrink, r.rows * shrink, r.cols * (1 - shrink), r.rows * (1 - shrink)]
                rows.append((split, r.image_id, "lung", f, *box, 0.9))
                rows.append((split, r.image_id, "lung", f, 0, 0, r.cols / 4, r.rows / 4, 0.3))  # weaker: never the window
    table = pd.DataFrame(rows, columns=["split", "image_id", "model", "fold", "x_min", "y_min", "x_max", "y_max", "conf"])
    for split, part in table.groupby("split"):
        DETECTIONS.write(part.drop(columns="split"), folder / f"pred_{split}.csv")
    return folder


def test_windows_come_from_the_same_folds_lung_model_and_its_best_box(prepared, tmp_path):
    prep = Prepared(prepared)
    lungs = LungBoxes.of_run(fake_lung_run(tmp_path / "lung", prep))
    val = prep.fold(1, "val")
    windows = lungs.windows(prep.meta, 1, list(val.image_id), "oof", conf=0.5, margin=0.0)
    r = val.iloc[0]
    assert windows[r.image_id] == pytest.approx((r.cols * 0.15, r.rows * 0.15, r.cols * 0.85, r.rows * 0.85))
    # fold 0's lung model saw fold 1's images (it trained on them): never their out-of-fold windows
    with pytest.raises(SiimError, match="no out-of-fold boxes of fold 0"):
        lungs.windows(prep.meta, 0, list(val.image_id), "oof", 0.5, 0.0)
    # images the lung run never predicted (e.g. another prepared folder's): an error, not a silent whole image
    with pytest.raises(SiimError, match="has no test boxes"):
        lungs.windows(prep.meta, 0, ["not-an-image"], "test", 0.5, 0.0)
    # below lung_conf: the whole image
    assert set(lungs.windows(prep.meta, 1, list(val.image_id), "oof", 0.95, 0.0).values()) == {None}
    # a lung run without fold 2's test boxes (fold 2 never trained): fold 2's model never sees the test images whole silently
    test = lungs.tables["test"]
    lungs.tables["test"] = test[test.fold != 2]
    ids = list(prep.split("test").image_id)
    assert None not in lungs.windows(prep.meta, 1, ids, "test", 0.5, 0.0).values()
    with pytest.raises(SiimError, match="no test boxes of fold 2"):
        lungs.windows(prep.meta, 2, ids, "test", 0.5, 0.0)
    assert widen((10, 20, 110, 220), 230, 115, 0.1) == pytest.approx((0, 0, 115, 230))


def test_lung_runs_are_checked(prepared, tmp_path):
    prep = Prepared(prepared)
    other = fake_lung_run(tmp_path / "other", prep, folds_id="0123456789ab")
    with pytest.raises(SiimError, match="other folds"):
        LungBoxes.of_run(other).check_folds(prep.folds_id, "this detect run")
    opacity = tmp_path / "opacity"
    opacity.mkdir()
    write_run(opacity / "detect.yaml", "detect", {"task": "opacity"}, {"mode": "train"})
    with pytest.raises(SiimError, match="not a lung detector"):
        LungBoxes.of_run(opacity)
    with pytest.raises(SiimError, match="needs lung="):
        cli.main(["detect", "train", f"data={prepared}", *TINY, f"project={tmp_path}", "crop=lung"])
    # another prepared folder's images (source=): the lung run has no boxes of them; the bundle's predict crops new images
    from siimcovid.config import Config
    from siimcovid.views import lungs_of

    with pytest.raises(SiimError, match="crop=lung with source=.*siimcovid predict"):
        lungs_of(Config(crop="lung", lung=str(other), source=str(prepared)))


def test_crop_labels_are_the_boxes_in_the_crops_pixels(prepared):
    prep = Prepared(prepared)
    image_id = next(i for i in prep.split("train").image_id if yolo_labels(prep.label_path(i, 128)).size)
    boxes = yolo_labels(prep.label_path(image_id, 128))
    shown = (0.1, 0.2, 0.9, 0.8)  # a normalised window
    h, w = 60, 80
    text = crop_labels(boxes, (h, w), shown)
    got = np.array([[float(v) for v in line.split()[1:]] for line in text.splitlines()]).reshape(-1, 4)
    x0 = ((boxes[:, 0] - 0.1) / 0.8).clip(0, 1)
    x1 = ((boxes[:, 2] - 0.1) / 0.8).clip(0, 1)
    keep = (x1 - x0) * w >= 1
    assert np.allclose(got[:, 0], ((x0 + x1) / 2)[keep][: len(got)], atol=1e-5)


@pytest.mark.slow
def test_yolo_trains_on_crops_and_predicts_both_views(prepared, tmp_path, monkeypatch):
    from siimcovid.rundir import read_run

    prep = Prepared(prepared)
    lung = fake_lung_run(tmp_path / "lung", prep)
    monkeypatch.chdir(tmp_path)  # lung= relative to here: the run records it absolute, so a resume elsewhere reads the same
    run = cli.main(
        ["detect", "train", f"data={prepared}", *TINY, f"project={tmp_path}", "name=crop", "fold=0", "crop=lung", "lung=lung"]
    )
    assert read_run(Path(run) / "detect.yaml")["lung"] == str(lung.resolve())
    listed = (Path(run) / "data" / "fold0_extra.txt").read_text().split()
    train_ids = set(prep.fold(0, "train").image_id)
    assert sorted(Path(p).stem for p in listed) == sorted(train_ids)  # one crop per training image of fold 0, no other
    crop = Path(listed[0])
    assert crop.is_file() and (crop.parent.parent / "labels" / f"{crop.stem}.txt").is_file()
    # the crop is the window's pixels of the prepared image
    from siimcovid.views import read_gray

    r = prep.meta.set_index("image_id").loc[crop.stem]
    window = widen((r.cols * 0.15, r.rows * 0.15, r.cols * 0.85, r.rows * 0.85), int(r.rows), int(r.cols), 0.05)
    expected, _ = cut(read_gray(prep.image_path(crop.stem, "train", 128)), window, int(r.rows), int(r.cols))
    assert np.array_equal(read_gray(crop), expected)

    out = cli.main(["detect", "predict", f"run={run}", "device=cpu", "tta=false", "crop=lung", f"lung={lung}", "conf=0.0001"])
    from siimcovid.rundir import saved_predict_settings

    saved = saved_predict_settings(run)  # what made pred_test.csv, for export: the views too
    assert (saved["crop"], saved["lung"], saved["crop_margin"], saved["view_fusion"]) == ("lung", str(lung), 0.05, "wbf")
    oof = DETECTIONS.read(out["crop"]["oof"])
    assert set(oof.image_id) <= set(prep.fold(0, "val").image_id) and (oof.fold == 0).all()
    meta = prep.meta.set_index("image_id")
    assert (oof.x_max <= meta.loc[oof.image_id, "cols"].to_numpy() + 1e-6).all()
    with pytest.raises(SiimError, match="needs lung="):
        cli.main(["detect", "predict", f"run={run}", "device=cpu", "crop=lung"])
    # the lung run predicted again since (other boxes): the trained folds cropped with the old ones, so no resume
    boxes = DETECTIONS.read(lung / "pred_oof.csv")
    DETECTIONS.write(boxes.assign(conf=boxes.conf * 0.99), lung / "pred_oof.csv")
    with pytest.raises(SiimError, match="was trained with lung_oof_sha256="):
        cli.main(
            ["detect", "train", f"data={prepared}", *TINY, f"project={tmp_path}", "name=crop", "fold=0", "crop=lung", "lung=lung"]
        )


def test_detect_views_map_each_views_boxes_back_to_original_pixels(prepared, tmp_path, monkeypatch):
    """A stand-in detector finds the one bright 3x3 block of each array it is shown: on the whole image and on the lung
    crop, the block drawn at a known place comes back at that place in original pixels."""
    from siimcovid import views
    from siimcovid.config import load_config

    prep = Prepared(prepared)
    lungs = LungBoxes.of_run(fake_lung_run(tmp_path / "lung", prep))
    image_id = prep.fold(0, "val").image_id.iloc[0]
    r = prep.meta.set_index("image_id").loc[image_id]
    image = np.zeros((128, 128), np.uint8)
    image[70:73, 40:43] = 255  # inside the window (15%..85% of each side)
    monkeypatch.setattr(views, "read_gray", lambda path: image)

    def bright(arrays):
        out = []
        for a in arrays:
            ys, xs = np.nonzero(a)
            out.append(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, 0.5]], dtype=np.float64))
        return out

    expected = [40 * r.cols / 128, 70 * r.rows / 128, 43 * r.cols / 128, 73 * r.rows / 128]
    cfg = load_config("detect", {"crop": "lung", "view_fusion": "concat", "crop_margin": 0.0, "lung_conf": 0.5})
    found = views.detect_views(bright, prep, 128, 0, [image_id], "train", lungs, cfg, "test")
    assert len(found) == 2  # the whole image's box, then the crop's
    for _, row in found.iterrows():
        assert row[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float) == pytest.approx(expected)
    cfg = load_config("detect", {"crop": "lung", "view_fusion": "wbf", "crop_margin": 0.0, "lung_conf": 0.5})
    fused = views.detect_views(bright, prep, 128, 0, [image_id], "train", lungs, cfg, "test")
    assert len(fused) == 1
    assert fused.iloc[0][["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=float) == pytest.approx(expected)


def test_a_family_checks_the_lung_runs_folds_on_every_call_that_gives_them(prepared, tmp_path):
    """The lung boxes are read once; the fold check is not skipped because an earlier call (the engine's, before the
    first fold) gave no fingerprint."""
    from siimcovid.config import load_config
    from siimcovid.detect.family import YoloFamily

    prep = Prepared(prepared)
    other = fake_lung_run(tmp_path / "other", prep, folds_id="0123456789ab")
    family = YoloFamily(load_config("detect", {"crop": "lung", "lung": str(other)}))
    assert family.lung_boxes(None) is not None
    with pytest.raises(SiimError, match="other folds"):
        family.lung_boxes(prep.folds_id)

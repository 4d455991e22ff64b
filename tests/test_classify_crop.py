"""Lung-crop views of the classifier (crop=lung): the crop a dataset returns, fold k's windows for fold k, the view
fusion, crop=none unchanged; lung boxes built by hand as a lung run's DETECTIONS tables, a stand-in model (only the
@slow test trains)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from siimcovid.classify import predict as P  # noqa: E402
from siimcovid.classify.data import StudyDataset, crop_view, image_table  # noqa: E402
from siimcovid.config import load_config  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.rundir import write_run  # noqa: E402
from siimcovid.tables import BOX_COLUMNS, CLASSIFIER_IMAGES, CLASSIFIER_STUDIES, DETECTIONS, STUDY_CLASSES  # noqa: E402
from siimcovid.utils import SiimError  # noqa: E402
from siimcovid.views import LungBoxes, pixel_window, to_original, window_of_crop  # noqa: E402

S = 64
CPU = torch.device("cpu")


def fold_box(rows: int, cols: int, fold: int) -> list[float]:
    """A lung box that depends on the fold of the lung model that found it: fold 0 the left part, fold 1 the right."""
    left = 0.05 + 0.3 * (fold % 2)
    return [left * cols, 0.1 * rows, (left + 0.55) * cols, 0.85 * rows]


def lung_row(image_id: str, fold: int, box, conf: float) -> dict:
    """One lung box of fold `fold`'s lung model, a DETECTIONS row."""
    return {"image_id": image_id, "model": "lung", "fold": fold, **dict(zip(BOX_COLUMNS, map(float, box))), "conf": conf}


def lung_tables(prep: Prepared, conf: float = 0.9, skip: int = 4) -> dict[str, pd.DataFrame]:
    """A lung run's tables: oof, each train image by its own fold; test, each test image by every fold; the box of
    fold_box; every `skip`-th image's box below lung_conf (no window; skip=0: none below)."""
    meta = prep.meta.set_index("image_id")
    out = {}
    for split, table in (("oof", prep.split("train")), ("test", prep.split("test"))):
        rows = []
        for n, image_id in enumerate(table.image_id):
            folds = [int(meta.at[image_id, "fold"])] if split == "oof" else range(prep.n_folds)
            r, c = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
            for k in folds:
                score = 0.1 if skip and n % skip == 0 else conf
                rows.append(lung_row(image_id, k, fold_box(r, c, k), score))
        out[split] = DETECTIONS.check(pd.DataFrame(rows))
    return out


def lung_run(prep: Prepared, folder: Path) -> Path:
    """A lung detector's run folder as `detect train task=lung` + `detect predict` leave it (settings and tables)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_run(folder / "detect.yaml", "detect", {"task": "lung"}, {"folds_id": prep.folds_id})
    for split, table in lung_tables(prep).items():
        DETECTIONS.write(table, folder / f"pred_{split}.csv")
    return folder


class Seeing(torch.nn.Module):
    """A stand-in classifier: study logits from the image's brightness (whole, left half), a none logit from its top;
    it keeps every batch it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        w, h = x.shape[-1] // 2, x.shape[-2] // 3
        mean, left, top = x.mean((1, 2, 3)), x[..., :w].mean((1, 2, 3)), x[..., :h, :].mean((1, 2, 3))
        z = torch.zeros_like(mean)
        return {"study": torch.stack([8 * mean, 8 * left, z, 4 * top], 1), "none": 6 * (top - 0.4), "mask": x[:, :, :2, :2]}


def source(prep: Prepared, views: P.Views | None, tta: bool = False) -> P.Source:
    how = P.Inference(CPU, None, False, tta, {"batch_size": 4, "num_workers": 0}, views=views)
    return P.Source(prep, S, how, "tiny")


def views_of(prep: Prepared, tables=None, fusion: str = "mean", conf: float = 0.5, margin: float = 0.0) -> P.Views:
    return P.Views(LungBoxes(tables or lung_tables(prep), "lung-test", prep.folds_id), conf, margin, fusion)


def grey(x: torch.Tensor) -> np.ndarray:
    return (x[0] * 255).round().byte().numpy()


# ---------------------------------------------------------------- the crop a dataset returns


def test_the_crop_of_a_dataset_is_the_windows_pixels(prepared, tmp_path):
    """A white square drawn into a prepared image (and its mask) lands in the crop where the window's map says."""
    root = Path(shutil.copytree(prepared, tmp_path / "prep", symlinks=True))
    prep = Prepared(root)
    table = image_table(prep, "train", 0, "val").iloc[:1].reset_index(drop=True)
    image_id = table.image_id[0]
    rows, cols = (int(prep.meta.set_index("image_id").at[image_id, k]) for k in ("rows", "cols"))
    px = (24, 20, 36, 30)  # the square in prepared pixels, and in original pixels:
    square = np.array([px[0] * cols / S, px[1] * rows / S, px[2] * cols / S, px[3] * rows / S])
    drawn = np.zeros((S, S), np.uint8)
    drawn[px[1] : px[3], px[0] : px[2]] = 255
    for path in (prep.image_path(image_id, "train", S), prep.mask_path(image_id, S)):
        path.unlink()  # a link into the source folder: never write through it
        assert cv2.imwrite(str(path), drawn)
    box = np.array([0.2 * cols, 0.15 * rows, 0.7 * cols, 0.6 * rows])
    tables = {"oof": DETECTIONS.check(pd.DataFrame([lung_row(image_id, 0, box, 0.9)]))}
    views = views_of(prep, tables, margin=0.1)
    (window,) = views.windows(prep, 0, table, "oof")
    assert np.allclose(window, [box[0] - 0.05 * cols, box[1] - 0.045 * rows, box[2] + 0.05 * cols, box[3] + 0.045 * rows])
    item = StudyDataset(prep, table, S, masks=True, windows=[window])[0]
    image, mask = item["image"][0].numpy(), item["mask"][0].numpy()
    assert image.shape == (S, S) and set(np.unique(mask)) <= {0, 255}
    ys, xs = np.nonzero(image > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=float)
    shown = window_of_crop(pixel_window(window, rows, cols, (S, S)), rows, cols, (S, S))
    assert np.allclose(to_original(found, (S, S), shown)[0], square, atol=cols / S)  # within a prepared pixel
    my, mx = np.nonzero(mask > 127)  # the mask cut the same way (nearest neighbour: within a pixel)
    assert np.allclose([mx.min(), my.min(), mx.max() + 1, my.max() + 1], found[0], atol=1.5)
    whole = StudyDataset(prep, table, S, masks=True, windows=[None])[0]  # no window: the whole image
    assert np.array_equal(whole["image"][0].numpy(), drawn)


def test_crop_view_is_cut_then_resized_to_the_input():
    image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    mask = np.zeros_like(image)
    mask[10:20, 10:20] = 255
    crop, crop_mask = crop_view(image, mask, (0.0, 0.0, 150.0, 128.0), 256, 300, 64)  # the top-left half of the original
    assert crop.shape == crop_mask.shape == (64, 64) and set(np.unique(crop_mask)) == {0, 255}
    assert np.array_equal(crop, cv2.resize(image[:32, :32], (64, 64), interpolation=cv2.INTER_LINEAR))


# ---------------------------------------------------------------- fold k's windows, for fold k


def test_each_fold_model_sees_its_own_folds_lung_windows(prepared):
    """Test images: fold 0's model sees fold 0's lung box, fold 1's model fold 1's (the fold-1 rows hold another box)."""
    prep = Prepared(prepared)
    views = views_of(prep)
    src = source(prep, views)
    table = image_table(prep, "test")
    for k in (0, 1):
        model = Seeing()
        P.predict_fold((model, None, Path("fold.pt")), src, k, "test")
        at, subset, windows = P.crop_subset(table, views.windows(prep, k, table, "test"))
        crops = torch.cat(model.seen[-len(range(0, len(at), 4)) :])  # the last batches seen (batch 4): the crops
        expected = StudyDataset(prep, subset, S, masks=False, windows=windows)
        assert len(at) and len(crops) == len(at)
        for i in range(len(at)):
            assert np.array_equal(grey(crops[i]), expected[i]["image"][0].numpy())
            meta = prep.meta.set_index("image_id").loc[subset.image_id[i]]
            assert np.allclose(windows[i], fold_box(int(meta.rows), int(meta.cols), k))  # margin 0: fold k's box
    assert views.windows(prep, 0, table, "test") != views.windows(prep, 1, table, "test")


def test_training_images_take_their_own_folds_out_of_fold_box(prepared):
    """own_fold_windows: a training image of fold j gets the box that fold j's lung model found out of fold."""
    prep = Prepared(prepared)
    train = image_table(prep, "train", 0, "train")
    tables = lung_tables(prep, skip=0)
    every = []  # every fold's box for every image: only the image's own fold's may be taken
    for k in range(prep.n_folds):
        every.append(tables["oof"].assign(fold=k, x_min=tables["oof"].x_min + k))
    views = views_of(prep, {"oof": pd.concat(every, ignore_index=True)})
    windows = P.own_fold_windows(views, prep, train)
    assert sorted(set(train.fold)) == [1, 2]
    mine = tables["oof"].set_index("image_id")
    for row, window in zip(train.itertuples(), windows):
        assert window[0] == pytest.approx(mine.at[row.image_id, "x_min"] + row.fold)


def test_no_out_of_fold_boxes_of_a_fold_is_an_error(prepared):
    """A fold the lung run did not predict is an error, never whole images only; and so are boxes of its images found
    by another fold's lung model (which trained on them: a leak)."""
    prep = Prepared(prepared)
    held_out = image_table(prep, "train", 2, "val")
    tables = lung_tables(prep)
    tables["oof"] = tables["oof"][tables["oof"].fold != 2]
    with pytest.raises(SiimError, match="no oof boxes of these"):
        views_of(prep, tables).windows(prep, 2, held_out, "train")
    tables = lung_tables(prep)
    tables["oof"] = tables["oof"].assign(fold=tables["oof"].fold.replace(2, 1))
    with pytest.raises(SiimError, match="no out-of-fold boxes of fold 2"):
        views_of(prep, tables).windows(prep, 2, held_out, "train")


# ---------------------------------------------------------------- view fusion


def test_view_fusion_mean_and_gmean():
    a = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]])
    b = np.array([[0.1, 0.7, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]])
    assert np.allclose(P.fuse_probabilities([a, b], "mean", total=True), (a + b) / 2)
    g = P.fuse_probabilities([a, b], "gmean", total=True)
    assert np.allclose(g.sum(axis=1), 1) and np.allclose(g, np.sqrt(a * b) / np.sqrt(a * b).sum(1, keepdims=True))
    assert g[0, 0] < (a + b)[0, 0] / 2  # gmean: a class the views disagree on loses more than under the mean
    p, q = np.array([0.9, 0.2, 0.0]), np.array([0.5, 0.2, 0.5])
    none = P.fuse_probabilities([p, q], "gmean", total=False)
    yes, no = np.sqrt(p * q), np.sqrt((1 - p) * (1 - q))
    assert np.allclose(none[:2], (yes / (yes + no))[:2]) and none[1] == pytest.approx(0.2) and 0 <= none[2] < 1e-5
    assert np.allclose(P.fuse_probabilities([a, a], "gmean", total=True), a)
    with pytest.raises(SiimError, match="view_fusion=max"):
        P.fuse_probabilities([a, b], "max", total=True)


@pytest.mark.parametrize("fusion", ["mean", "gmean"])
def test_predict_fuses_the_whole_and_the_crop_view_per_image(prepared, fusion):
    """oof: each held-out image's probabilities are its whole view's and its crop view's fused (each with its own
    mirror); an image without a window keeps its whole view's."""
    prep = Prepared(prepared)
    views = views_of(prep, fusion=fusion)
    table = image_table(prep, "train", 1, "val")
    model = Seeing()
    fused = P.predict_fold((model, None, Path("fold.pt")), source(prep, views, tta=True), 1, "train")
    whole = P.predict_fold((model, None, Path("fold.pt")), source(prep, None, tta=True), 1, "train")
    at, subset, windows = P.crop_subset(table, views.windows(prep, 1, table, "oof"))
    loader = torch.utils.data.DataLoader(StudyDataset(prep, subset, S, masks=False, windows=windows), batch_size=4)
    _, crop_study, crop_none, _ = P.infer(model, loader, CPU, tta=True)
    assert 0 < len(at) < len(table) and list(fused.columns) == CLASSIFIER_IMAGES.names
    cropped = fused.image_id.isin(subset.image_id)
    assert fused[~cropped][STUDY_CLASSES + ["none"]].equals(whole[~cropped][STUDY_CLASSES + ["none"]])
    by_id = whole.set_index("image_id").loc[subset.image_id]
    expect = P.fuse_probabilities([by_id[STUDY_CLASSES].to_numpy(), crop_study], fusion, total=True)
    expect_none = P.fuse_probabilities([by_id["none"].to_numpy(), crop_none], fusion, total=False)
    got = fused.set_index("image_id").loc[subset.image_id]
    assert np.allclose(got[STUDY_CLASSES].to_numpy(), expect) and np.allclose(got["none"], expect_none)
    assert not np.allclose(got[STUDY_CLASSES].to_numpy(), by_id[STUDY_CLASSES].to_numpy())  # the crop view counts
    assert np.allclose(fused[STUDY_CLASSES].sum(axis=1), 1)


# ---------------------------------------------------------------- crop=none unchanged


def test_crop_none_is_the_single_view_path(prepared):
    """crop=none predicts exactly what a plain pass of the model gives; crop=lung with no confident lung box too."""
    prep = Prepared(prepared)
    table = image_table(prep, "test")
    plain = P.infer(Seeing(), torch.utils.data.DataLoader(StudyDataset(prep, table, S, masks=False), batch_size=4), CPU, tta=True)
    _, study, none = P.predict_fold((Seeing(), None, Path("f.pt")), source(prep, None, tta=True), 0, "test")
    assert np.array_equal(study, plain[1]) and np.array_equal(none, plain[2]) and study.dtype == np.float32
    unsure = views_of(prep, conf=0.95)  # every lung box below lung_conf: no crop view anywhere
    _, study2, none2 = P.predict_fold((Seeing(), None, Path("f.pt")), source(prep, unsure, tta=True), 0, "test")
    assert np.array_equal(study2, plain[1]) and np.array_equal(none2, plain[2])


def test_crop_none_asks_for_no_lung_run_and_crop_lung_needs_one(prepared, tmp_path):
    assert P.Views.of(load_config("classify", {}), None) is None
    with pytest.raises(SiimError, match="crop=lung needs lung="):
        P.Views.of(load_config("classify", {"crop": "lung"}), None)
    prep = Prepared(prepared)
    run = lung_run(prep, tmp_path / "lung")
    with pytest.raises(SiimError, match="other folds"):
        P.Views.of(load_config("classify", {"crop": "lung", "lung": str(run)}), "another-fingerprint")
    views = P.Views.of(load_config("classify", {"crop": "lung", "lung": str(run), "view_fusion": "gmean"}), prep.folds_id)
    assert views.fusion == "gmean" and set(views.lungs.tables) == {"oof", "test"}


def test_train_refuses_a_lung_run_without_out_of_fold_boxes_before_writing(prepared, tmp_path):
    """Training crops with the lung run's out-of-fold boxes: a lung run with test boxes only is refused up front."""
    from siimcovid.classify.train import main as train

    run = lung_run(Prepared(prepared), tmp_path / "lung")
    (run / "pred_oof.csv").unlink()
    settings = {"model": "resnet10t", "pretrained": False, "imgsz": S, "workers": 0, "device": "cpu", "name": "c"}
    cfg = load_config("classify", {**settings, "data": str(prepared), "project": str(tmp_path / "runs")})
    with pytest.raises(SiimError, match=r"no out-of-fold boxes \(pred_oof.csv\)"):
        train(load_config("classify", {**cfg, "crop": "lung", "lung": str(run)}))
    assert not (tmp_path / "runs" / "c").exists()


# ---------------------------------------------------------------- training


def test_training_data_gains_each_windowed_images_crop_and_validation_its_views(prepared, tmp_path):
    """crop_train: the training images with a window once more, cropped (the same labels); validation's crop views
    are the held-out images with fold k's window; crop_train=false: whole images only."""
    from siimcovid.classify.dist import setup
    from siimcovid.classify.train import FoldTrainer

    prep = Prepared(prepared)
    run = lung_run(prep, tmp_path / "lung")
    settings = {"model": "resnet10t", "pretrained": False, "imgsz": S, "batch": 4, "workers": 0, "device": "cpu"}
    cfg = load_config("classify", {**settings, "data": str(prepared), "crop": "lung", "lung": str(run), "name": "c"})
    folder = tmp_path / "fold0"
    folder.mkdir()
    trainer = FoldTrainer(cfg, prep, 0, S, folder, setup("cpu"))
    n, data = len(trainer.train_tab), trainer.train_dataset
    windows = P.own_fold_windows(trainer.views, prep, trainer.train_tab)
    windowed = [i for i, w in enumerate(windows) if w is not None]
    assert 0 < len(windowed) < n and len(data) == n + len(windowed)
    for j, i in enumerate(windowed[:3]):
        extra, own = data.table.iloc[n + j], trainer.train_tab.iloc[i]
        assert extra.image_id == own.image_id and extra.label == own.label and extra.none == own.none
        assert data.windows[n + j][0] == windows[i] and data.windows[i] is None
    val_windows = trainer.views.windows(prep, 0, trainer.val_tab, "oof")
    assert len(trainer.val_crop_loader.dataset) == sum(w is not None for w in val_windows)
    off = FoldTrainer(load_config("classify", {**cfg, "crop_train": False}), prep, 0, S, folder, setup("cpu"))
    assert len(off.train_dataset) == n and off.val_crop_loader is not None
    plain = FoldTrainer(load_config("classify", {**cfg, "crop": "none"}), prep, 0, S, folder, setup("cpu"))
    assert len(plain.train_dataset) == n and plain.val_crop_loader is None and plain.train_dataset.windows is None


@pytest.mark.slow
def test_train_and_predict_with_lung_crops_write_the_contract_tables(prepared, tmp_path):
    """classify train fold=0 epochs=1 crop=lung, then classify predict crop=lung: the tables of the contracts; the
    run records its crop settings, and a resume under crop=none is refused."""
    from siimcovid.classify.predict import main as predict
    from siimcovid.classify.train import main as train
    from siimcovid.rundir import read_run
    from siimcovid.rundir import saved_predict_settings as read_predict_settings

    prep = Prepared(prepared)
    run = lung_run(prep, tmp_path / "lung")
    settings = {"model": "resnet10t", "pretrained": False, "imgsz": S, "batch": 8, "workers": 0, "device": "cpu"}
    settings |= {"epochs": 1, "fine_lr": [], "data": str(prepared), "project": str(tmp_path / "runs"), "name": "crop"}
    train(load_config("classify", {**settings, "fold": 0, "crop": "lung", "lung": str(run)}))
    folder = tmp_path / "runs" / "crop"
    record = read_run(folder / "classify.yaml")
    assert record["crop"] == "lung" and record["lung"] == str(run.resolve()) and record["crop_train"] is True
    with pytest.raises(SiimError, match="crop"):
        train(load_config("classify", {**settings, "fold": 0, "epochs": 2}))  # crop=none now: refused
    views = {"crop": "lung", "lung": str(run), "batch": 8}
    predict(load_config("classify", {"run": str(folder), "split": ["oof", "test"], "workers": 0, "device": "cpu"} | views))
    saved = read_predict_settings(folder)  # what export packs: the views beside tta and weights
    assert saved["crop"] == "lung" and saved["lung"] == str(run.resolve()) and saved["view_fusion"] == "mean"
    images, studies = P.read_tables(folder, "oof")
    assert list(images.columns) == CLASSIFIER_IMAGES.names and list(studies.columns) == CLASSIFIER_STUDIES.names
    assert sorted(images.image_id) == sorted(prep.fold(0, "val").image_id)
    test, _ = P.read_tables(folder, "test")
    assert sorted(test.image_id) == sorted(prep.split("test").image_id) and np.allclose(test[STUDY_CLASSES].sum(axis=1), 1)


# ---------------------------------------------------------------- siimcovid run


def test_run_gives_the_classifier_its_views_for_train_and_predict(tmp_path):
    """crop=lung in `run`: classify train and predict get the lung run; predict crops as train did (the classify
    section's crop_margin) and fuses by classify_predict's view_fusion; crop=none: whole images, as before."""
    from siimcovid.run import classify_configs, crop_views

    sections = {"classify": {"crop_margin": 0.2, "crop_train": False}, "classify_predict": {"view_fusion": "gmean"}}
    cfg = load_config("run", {"name": "x", "data": str(tmp_path / "siim"), "crop": "lung", **sections})
    lung = tmp_path / "runs" / "detect" / "x-lung"
    train, predict = classify_configs(cfg, tmp_path / "prep", tmp_path / "runs", views=crop_views(cfg, lung))
    assert (train.crop, train.lung, train.crop_margin, train.crop_train) == ("lung", str(lung), 0.2, False)
    assert (predict.crop, predict.lung, predict.crop_margin, predict.view_fusion) == ("lung", str(lung), 0.2, "gmean")
    train, predict = classify_configs(cfg, tmp_path / "prep", tmp_path / "runs")
    assert train.crop == predict.crop == "none" and predict.crop_margin == 0.05

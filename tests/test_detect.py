"""detect stage: train per fold (skip, resume), presets, evolve, predict in original pixels, OOF scores, errors.

Tiny on purpose: yolov5n.yaml from scratch (pretrained=False), 64 px, one epoch, CPU.
One trained 3-fold run is shared by the tests that only read it. Every test that trains a model
(or uses the trained run) is marked slow; the scoring tests use hand-written box tables.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from siimcovid import cli
from siimcovid.config import ConfigError
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import IMAGE_CSV, Problems, read_image_level
from siimcovid.detect.common import HYP_DIR, TRAIN_KEYS, fold_state, hyp_presets, load_hyp
from siimcovid.detect.predict import boxes_to_original, scores_oof
from siimcovid.rundir import read_run
from siimcovid.tables import DETECTIONS
from siimcovid.utils import SiimError

TINY = ["model=yolov5n.yaml", "pretrained=false", "epochs=1", "imgsz=64", "batch=8", "workers=0", "device=cpu", "plots=false"]


def detect(mode: str, *args: str):
    return cli.main(["detect", mode, *map(str, args)])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs_detect")


@pytest.fixture(scope="module")
def trained(prepared, project) -> Path:
    """All 3 folds, one epoch each; a preset plus command-line and pass-through overrides."""
    return detect(
        "train", f"data={prepared}", *TINY, f"project={project}", "name=tiny3", "hyp=yolov5x-mixup", "mixup=0.3", "cos_lr=true"
    )


@pytest.fixture(scope="module")
def predicted(trained) -> dict:
    return detect("predict", f"run={trained}", "device=cpu", "batch=16", "predict_imgsz=64")


# --- train ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_writes_one_finished_ultralytics_run_per_fold(trained, prepared):
    for k in range(3):
        fold_dir = trained / f"fold{k}"
        assert (fold_dir / "weights" / "best.pt").is_file()
        assert fold_state(fold_dir) == "done"
        assert len(pd.read_csv(fold_dir / "results.csv")) == 1  # one epoch
        args = yaml.safe_load((fold_dir / "args.yaml").read_text())
        assert Path(args["data"]).name == f"tiny_fold{k}.yaml"  # each fold from its own data YAML
        assert args["mosaic"] == 0.7  # from the preset
        assert args["mixup"] == 0.3  # the command line beats the preset
        assert args["cos_lr"] is True  # an Ultralytics key passed through
        assert args["optimizer"] == "SGD" and args["close_mosaic"] == 0
    saved = read_run(trained / "detect.yaml")
    assert Path(saved["prepared"]) == Path(prepared).resolve()
    assert saved["size"] == 128 and saved["hyp"] == "yolov5x-mixup"
    # the saved file seeds the next run as is: its settings come back, what it recorded does not
    _, again = cli.stage_function("detect", "train", {"cfg": str(trained / "detect.yaml"), "name": "next"})
    assert again.hyp == "yolov5x-mixup" and again.mixup == 0.3 and again.cos_lr is True and again.name == "next"
    assert not {"prepared", "size", "folds_id", "data_yamls", "hyp_values"} & set(again)


@pytest.mark.slow
def test_rerun_skips_finished_folds(trained, prepared, project, monkeypatch):
    from ultralytics.engine.model import Model

    before = {k: (trained / f"fold{k}" / "weights" / "best.pt").stat().st_mtime_ns for k in range(3)}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(Model, "train", no_training)
    detect(
        "train", f"data={prepared}", *TINY, f"project={project}", "name=tiny3", "hyp=yolov5x-mixup", "mixup=0.3", "cos_lr=true"
    )
    after = {k: (trained / f"fold{k}" / "weights" / "best.pt").stat().st_mtime_ns for k in range(3)}
    assert after == before


@pytest.mark.slow
def test_finished_folds_are_not_skipped_under_other_settings(trained, prepared, project):
    # their scores would be reported under settings they were never trained with
    before = (trained / "detect.yaml").read_text()
    common = [f"data={prepared}", f"project={project}", "name=tiny3", "hyp=yolov5x-mixup", "cos_lr=true"]
    other = [a for a in TINY if not a.startswith("epochs=")] + ["epochs=2", "mixup=0.3"]
    with pytest.raises(SiimError, match=r"fold0 was trained with epochs=1 \(now 2\)"):
        detect("train", *common, *other)
    with pytest.raises(SiimError, match=r"was trained with model=yolov5n.yaml \(now yolov5s.yaml\), mixup=0.3 \(now 0.1\)"):
        detect("train", *common, *[a for a in TINY if not a.startswith("model=")], "model=yolov5s.yaml", "mixup=0.1")
    assert (trained / "detect.yaml").read_text() == before  # the run's saved settings still describe its folds


@pytest.mark.slow
def test_interrupted_fold_resumes_from_last_checkpoint(prepared, project):
    from siimcovid.config import load_config
    from siimcovid.detect.common import ultralytics_keys
    from siimcovid.detect.train import train

    overrides = dict(item.split("=", 1) for item in TINY)
    overrides.update(data=str(prepared), fold="2", epochs="2", project=str(project), name="resume")
    cfg = load_config("detect", [f"{k}={v}" for k, v in overrides.items()], extra_ok=ultralytics_keys())

    class Interrupt(Exception):
        pass

    def interrupt(trainer):  # after the first epoch's checkpoint is written
        raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, callbacks={"on_model_save": interrupt})
    fold_dir = project / "resume" / "fold2"
    assert fold_state(fold_dir) == "partial"
    with pytest.raises(SiimError, match=r"folds \[2\] have not finished training"):
        detect("predict", f"run={project / 'resume'}", "device=cpu", "split=oof")  # a fold still training

    seen = {}
    train(cfg, callbacks={"on_train_start": lambda trainer: seen.setdefault("start_epoch", trainer.start_epoch)})
    assert seen["start_epoch"] == 1  # continued at the second epoch, not from scratch
    assert fold_state(fold_dir) == "done"
    assert list(pd.read_csv(fold_dir / "results.csv").epoch) == [1, 2]
    assert not (project / "resume" / "fold0").exists()  # fold=2 trained that fold only


def test_a_resume_passes_on_the_train_keys_that_may_change_and_refuses_the_others(tmp_path, monkeypatch):
    # batch is a training setting (not tagged runtime): a changed batch is refused before a resume, as before,
    # and the resume keeps the checkpoint's batch; device, workers and plots may change and go to Ultralytics
    from siimcovid.detect import train as train_module

    assert set(train_module.RESUME_KEYS) == {"device", "workers", "plots"}
    trained_with = {"epochs": 1, "imgsz": 64, "batch": 8, "device": "cpu", "workers": 0, "pretrained": False, "plots": False}
    other = {"epochs": 2, "imgsz": 128, "batch": 16, "device": 0, "workers": 4, "pretrained": True, "plots": True}
    assert set(other) == set(TRAIN_KEYS)
    folder = tmp_path / "fold0"
    (folder / "weights").mkdir(parents=True)
    (folder / "args.yaml").write_text(yaml.safe_dump({**trained_with, "model": "yolov5n.yaml", "mosaic": 1.0}))
    for key in TRAIN_KEYS:
        now = {**trained_with, "mosaic": 1.0, key: other[key]}
        if key in train_module.RESUME_KEYS:
            train_module.check_fold_settings(folder, now, "yolov5n.yaml")
        else:
            with pytest.raises(SiimError, match=rf"fold0 was trained with {key}=.* \(now {other[key]}\)"):
                train_module.check_fold_settings(folder, now, "yolov5n.yaml")

    calls = []

    class FakeYOLO:  # records what a resume hands to Ultralytics
        def __init__(self, weights):
            calls.append(Path(weights))

        def train(self, **kwargs):
            calls.append(kwargs)

    monkeypatch.setattr(train_module, "YOLO", FakeYOLO)
    now = {**trained_with, "mosaic": 1.0, "device": 0, "workers": 4}
    done = train_module.train_fold(now, "yolov5n.yaml", tmp_path / "d_fold0.yaml", tmp_path, 0, "map50", state="partial")
    assert done == "resumed"
    assert calls[0] == folder / "weights" / "last.pt"
    assert calls[1] == {
        "resume": True,
        "data": str(tmp_path / "d_fold0.yaml"),
        "device": 0,
        "workers": 4,
        "plots": False,
        "trainer": train_module.Map50Trainer,
    }


# --- presets ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_presets_are_plain_ultralytics_configs_with_the_documented_augmentation():
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

    assert {"yolov5m", "yolov5x-mixup", "yolov5x-mosaic", "yolov5-1st"} <= set(hyp_presets())
    for name in hyp_presets():
        raw = yaml.safe_load((HYP_DIR / f"{name}.yaml").read_text())
        assert not set(raw) & set(TRAIN_KEYS), name  # epochs/imgsz/batch belong to the command line
        cfg = get_cfg(DEFAULT_CFG_DICT, raw)  # what `yolo detect train cfg=<preset>` does: validates keys and types
        assert cfg.mosaic == raw["mosaic"]
    mixes = {
        n: (load_hyp(n)["mosaic"], load_hyp(n)["mixup"]) for n in ("yolov5x-mixup", "yolov5x-mosaic", "yolov5-1st", "yolov5m")
    }
    assert mixes == {"yolov5x-mixup": (0.7, 0.16), "yolov5x-mosaic": (1.0, 0.0), "yolov5-1st": (1.0, 0.5), "yolov5m": (1.0, 0.0)}


# --- predict ----------------------------------------------------------------------------------------------


class _Results:
    """The two fields of an Ultralytics Results that the mapping reads."""

    def __init__(self, xyxy, conf, orig_shape):
        from ultralytics.engine.results import Boxes

        data = torch.tensor([[*b, c, 0.0] for b, c in zip(xyxy, conf)], dtype=torch.float32).reshape(-1, 6)
        self.boxes, self.orig_shape = Boxes(data, orig_shape), orig_shape


@pytest.mark.slow
def test_boxes_map_from_the_square_image_back_to_original_pixels():
    # A 300 wide x 256 high original, prepared as a 128 x 128 square.
    result = _Results([[32, 64, 96, 128], [0, 0, 128, 128]], [0.9, 0.2], (128, 128))
    out = boxes_to_original(result, rows=256, cols=300)
    np.testing.assert_allclose(out, [[75, 128, 225, 256, 0.9], [0, 0, 300, 256, 0.2]], rtol=1e-6)
    empty = boxes_to_original(_Results([], [], (128, 128)), rows=256, cols=300)
    assert empty.shape == (0, 5)


@pytest.mark.slow
def test_predict_agrees_with_ultralytics_after_its_letterbox(trained, predicted, prepared):
    """The model reads 128 px images at imgsz 64 (Ultralytics resizes and maps back to 128 px);
    the CSV must equal those boxes scaled to the original cols x rows."""
    from ultralytics import YOLO

    meta = Prepared(prepared).meta.set_index("image_id")
    oof = pd.read_csv(predicted["tiny3"]["oof"], dtype={"image_id": str})
    image_id = oof.image_id.iloc[0]
    fold = int(meta.at[image_id, "fold"])
    rows, cols = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
    assert rows != cols  # a non-square original, so a rows/cols mix-up would show
    raw = YOLO(str(trained / f"fold{fold}" / "weights" / "best.pt")).predict(
        str(Prepared(prepared).image_path(image_id, "train", 128)),
        imgsz=64,
        conf=0.001,
        iou=0.5,
        augment=True,
        max_det=100,
        device="cpu",
        verbose=False,
    )[0]
    expected = raw.boxes.xyxy.numpy() * np.array([cols / 128, rows / 128, cols / 128, rows / 128])
    got = oof[oof.image_id == image_id].sort_values("conf", ascending=False, kind="stable")
    order = np.argsort(-raw.boxes.conf.numpy(), kind="stable")
    np.testing.assert_allclose(
        got[["x_min", "y_min", "x_max", "y_max"]].to_numpy(), expected[order].clip(0, [cols, rows, cols, rows]), atol=0.05
    )


@pytest.mark.slow
def test_predict_writes_tidy_oof_and_test_files(trained, predicted, prepared):
    prep = Prepared(prepared)
    meta = prep.meta.set_index("image_id")
    oof = pd.read_csv(predicted["tiny3"]["oof"], dtype={"image_id": str})
    test = pd.read_csv(predicted["tiny3"]["test"], dtype={"image_id": str})
    for df in (oof, test):
        assert list(df.columns) == DETECTIONS.required
        assert (df.model == "tiny3").all()
        assert (df.x_max >= df.x_min).all() and (df.y_max >= df.y_min).all()
        assert (df.x_min >= 0).all() and (df.y_min >= 0).all()
        assert (df.x_max <= meta.loc[df.image_id, "cols"].to_numpy()).all()
        assert (df.y_max <= meta.loc[df.image_id, "rows"].to_numpy()).all()
        assert df.conf.between(0.001, 1).all()
    # OOF: each train image by the model of its own fold only.
    assert set(oof.image_id) <= set(prep.split("train").image_id)
    assert (oof.fold.to_numpy() == meta.loc[oof.image_id, "fold"].to_numpy()).all()
    assert oof.image_id.nunique() > len(prep.split("train")) // 2
    # test: every fold's model on the test images.
    assert set(test.image_id) <= set(prep.split("test").image_id)
    assert set(test.fold) == {0, 1, 2}
    assert (test.groupby("fold").image_id.nunique() > 0).all()
    # the settings that made them, recorded for `siimcovid export`
    from siimcovid.rundir import saved_predict_settings

    assert saved_predict_settings(trained) == {"conf": 0.001, "iou": 0.5, "tta": True, "max_det": 100, "predict_imgsz": 64,
                                               "weights": "best"}  # fmt: skip


@pytest.mark.slow
def test_predict_reports_oof_opacity_ap(predicted, trained):
    table = pd.read_csv(trained / "scores_oof.csv", dtype={"fold": str})
    assert list(table.fold) == ["all", "0", "1", "2"]
    assert table.set_index("fold").at["all", "n_images"] == 50
    assert table.opacity.between(0, 1).all() and (table.model == "tiny3").all()


def _oof_boxes(prepared: Path, boxes_of: dict, conf) -> pd.DataFrame:
    """A DETECTIONS table: these boxes (image_id -> list of x1y1x2y2) of every train image, by its own fold."""
    train = Prepared(prepared).split("train")
    rows = [(i, "handmade", f, *b) for i, f in zip(train.image_id, train.fold) for b in boxes_of.get(i, [])]
    table = pd.DataFrame(rows, columns=["image_id", "model", "fold", "x_min", "y_min", "x_max", "y_max"])
    table["conf"] = conf(len(table))
    return table[DETECTIONS.required]


def test_oof_scores_take_the_truth_boxes_as_perfect_and_shifted_boxes_lower(prepared, synth_root):
    truth = read_image_level(synth_root / IMAGE_CSV, Problems())  # the competition's boxes, straight from the CSV
    perfect = _oof_boxes(prepared, dict(zip(truth.image_id, truth.boxes)), lambda n: np.full(n, 0.9))
    table = scores_oof(perfect, Prepared(prepared), [0, 1, 2], "handmade")
    assert list(table.fold) == ["all", "0", "1", "2"] and (table.model == "handmade").all()
    assert (table.opacity == 1.0).all() and table.at[0, "n_images"] == len(Prepared(prepared).split("train"))
    shifted = perfect.copy()
    width = shifted.x_max - shifted.x_min
    shifted.loc[shifted.index % 2 == 0, ["x_min", "x_max"]] += width[shifted.index % 2 == 0].to_numpy()[:, None]
    assert 0 < scores_oof(shifted, Prepared(prepared), [0, 1, 2], "handmade").at[0, "opacity"] < 1  # half no longer overlap


def _cross_the_left_border(root: Path) -> str:
    """Move the first box of the first image with boxes across the left border of train_image_level.csv
    (its boxes and label columns both): x from -40 to 20, so the box clipped to the image has IoU 1/3
    with it. Returns the image id."""
    path = root / IMAGE_CSV
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    i = df.index[df.boxes != ""][0]
    boxes = ast.literal_eval(df.at[i, "boxes"])
    boxes[0] = {**boxes[0], "x": -40.0, "width": 60.0}
    df.at[i, "boxes"] = str(boxes)
    df.at[i, "label"] = " ".join(f"opacity 1 {b['x']} {b['y']} {b['x'] + b['width']} {b['y'] + b['height']}" for b in boxes)
    df.to_csv(path, index=False)
    return df.at[i, "id"].removesuffix("_image")


def test_detector_oof_scores_and_fusion_score_one_box_table_against_the_same_truth(tiny_root, tmp_path):
    """The same boxes scored by `detect predict`'s OOF scores and by fusion of that one member
    (no re-weighting) give the same AP(opacity): both score against the unclipped CSV boxes."""
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
    from siimcovid.metrics import box_iou

    crossing = _cross_the_left_border(tiny_root)
    settings = {"data": str(tiny_root), "out": str(tmp_path / "prep"), "sizes": [64], "n_folds": 2, "workers": 1}
    prepared = prepare(load_config("prepare", {**settings, "data_yaml_dir": str(tmp_path / "data_yaml")}))
    meta = Prepared(prepared).split("train")
    clipped = dict(zip(meta.image_id, meta.boxes))  # what the old truth scored: boxes clipped to the image
    assert clipped[crossing][0][0] == 0 and clipped[crossing][0][2] == 20
    for boxes in clipped.values():  # no two boxes of an image overlap enough for WBF to merge them
        pairs = [(a, b) for j, a in enumerate(boxes) for b in boxes[j + 1 :]]
        assert all(box_iou(np.array([a]), np.array([b]))[0] < 0.5 for a, b in pairs)
    # the detector found every box as the image shows it (clipped), with distinct confidences
    pred = _oof_boxes(prepared, clipped, lambda n: np.linspace(0.95, 0.05, n))
    det_ap = scores_oof(pred, Prepared(prepared), [0, 1], "handmade").at[0, "opacity"]
    det_file = DETECTIONS.write(pred, tmp_path / "pred_oof.csv")
    fused = cli.main(
        ["fuse", "split=oof", f"data={prepared}", f"det={det_file}", "opacity_exponent=0", "workers=1"]
        + [f"project={tmp_path / 'fuse'}", "name=one"]
    )
    assert det_ap == pytest.approx(fused["score"].ap["opacity"], abs=1e-12)
    assert det_ap < 1.0  # the crossing box counts as missed: scored against the unclipped truth, not the clipped one


@pytest.mark.slow
def test_predict_several_runs_at_once(trained, tmp_path):
    other = tmp_path / "tiny3-copy"
    shutil.copytree(trained, other, ignore=shutil.ignore_patterns("pred_*.csv", "scores_oof.csv"))
    written = detect(
        "predict",
        f"run={trained},{other}",
        "split=test",
        "tta=false",
        "device=cpu",
        "predict_imgsz=64",
        f"out={tmp_path / 'all'}",
    )
    assert set(written) == {"tiny3", "tiny3-copy"}
    together = pd.read_csv(tmp_path / "all" / "pred_test.csv", dtype={"image_id": str})
    assert set(together.model) == {"tiny3", "tiny3-copy"}
    copy = pd.read_csv(other / "pred_test.csv", dtype={"image_id": str})
    assert len(together) == 2 * len(copy)  # same weights, same boxes
    assert not (other / "pred_oof.csv").exists()  # split=test only


@pytest.mark.slow
def test_a_run_from_the_plain_yolo_cli_loads_with_a_warning_about_its_folds(trained, prepared, tmp_path, caplog):
    from siimcovid.detect.predict import load_run

    plain = Path(shutil.copytree(trained, tmp_path / "plain", ignore=shutil.ignore_patterns("pred_*.csv", "scores_oof.csv")))
    (plain / "detect.yaml").unlink()  # what `yolo detect train data=data_yaml/<name>_fold<k>.yaml` leaves
    run = load_run(plain)
    assert run.prepared.root.resolve() == Path(prepared).resolve() and sorted(run.weights) == [0, 1, 2]
    assert "fold assignment cannot be checked" in caplog.text


# --- evolve -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evolve_runs_two_iterations_and_exports_a_preset(prepared_small, project):
    from ultralytics.cfg import DEFAULT_CFG_DICT, get_cfg

    out = detect(
        "evolve", f"data={prepared_small}", *TINY, f"project={project}", "name=evo", "fold=1", "iterations=2",
        "hyp=yolov5x-mosaic",
    )
    tune = project / "evo" / "tune"
    results = [json.loads(line) for line in (tune / "tune_results.ndjson").read_text().splitlines() if line.strip()]
    assert [r["iteration"] for r in results] == [1, 2]
    assert results[0]["hyperparameters"]["mosaic"] == 1.0  # the first iteration is the starting preset
    assert results[1]["hyperparameters"] != results[0]["hyperparameters"]  # the second one mutates it
    assert set(results[0]["hyperparameters"]) == set(read_run(project / "evo" / "detect.yaml")["ranges"])
    _, again = cli.stage_function("detect", "evolve", {"cfg": str(project / "evo" / "detect.yaml"), "name": "evo2"})
    assert again.iterations == 2 and again.fold == 1 and "hyp_values" not in again  # its saved settings: a valid cfg=

    preset = load_hyp(str(out))  # what `detect train hyp=<out>` does
    best = yaml.safe_load((tune / "best_hyperparameters.yaml").read_text())
    assert {k: preset[k] for k in best} == best
    assert preset["optimizer"] == "SGD" and preset["close_mosaic"] == 0  # the rest of the starting preset
    get_cfg(DEFAULT_CFG_DICT, preset)  # and a valid plain Ultralytics cfg


def test_evolve_continues_a_tuning_run_only_under_its_settings(prepared, tmp_path, monkeypatch):
    # no training: Ultralytics' tune is replaced by one that writes what a finished iteration leaves
    from ultralytics.engine.model import Model

    calls = []

    def fake_tune(self, **kwargs):
        calls.append(kwargs)
        tune = Path(kwargs["project"]) / kwargs["name"]
        tune.mkdir(parents=True, exist_ok=True)
        (tune / "tune_results.ndjson").write_text(json.dumps({"iteration": 1, "fitness": 0.1}) + "\n")
        (tune / "best_hyperparameters.yaml").write_text("mosaic: 0.9\n")

    monkeypatch.setattr(Model, "tune", fake_tune)
    base = [f"data={prepared}", *TINY, f"project={tmp_path}", "name=evo", "fold=1", "hyp=yolov5m"]
    out = detect("evolve", *base, "iterations=2")
    assert calls[-1]["resume"] is False and load_hyp(str(out))["mosaic"] == 0.9
    saved = (tmp_path / "evo" / "detect.yaml").read_text()

    with pytest.raises(SiimError, match=r"evo was trained with epochs=1 \(now 2\): use another name=, or delete .*tune"):
        detect("evolve", *[a for a in base if not a.startswith("epochs=")], "epochs=2", "iterations=2")
    with pytest.raises(SiimError, match=r"trained with hyp=yolov5m \(now yolov5x-mixup\), hyp_values="):
        detect("evolve", *[a for a in base if not a.startswith("hyp=")], "hyp=yolov5x-mixup", "iterations=2")
    assert (tmp_path / "evo" / "detect.yaml").read_text() == saved  # still the settings of the iterations so far
    assert len(calls) == 1

    # more iterations and other runtime settings: the tuning continues where it stopped
    detect("evolve", *[a for a in base if not a.startswith("workers=")], "workers=1", "iterations=4")
    assert calls[-1]["resume"] is True and calls[-1]["iterations"] == 4
    assert read_run(tmp_path / "evo" / "detect.yaml")["iterations"] == 4


# --- errors and the CLI -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_clear_errors(prepared, project, tmp_path):
    base = [*TINY, f"project={project}", "name=errors"]
    with pytest.raises(SiimError, match="fold 5 does not exist"):
        detect("train", f"data={prepared}", "fold=5", *base)
    with pytest.raises(SiimError, match="data YAML not found"):
        detect("train", f"data={tmp_path / 'missing_fold0.yaml'}", *base)
    fake = tmp_path / "prepared_without_yamls"  # a prepared folder whose data YAMLs are gone
    fake.mkdir()
    shutil.copy(Path(prepared) / "meta.csv", fake)
    prep_cfg = Prepared.read_cfg(prepared)  # its settings and what it learned, written back as one mapping
    (fake / "prepare.yaml").write_text(yaml.safe_dump({**prep_cfg, "data_yaml_dir": str(tmp_path / "nowhere")}))
    with pytest.raises(SiimError, match="data YAML not found"):
        detect("train", f"data={fake}", f"data_yaml_dir={tmp_path / 'nowhere'}", *base)
    with pytest.raises(SiimError, match="weights not found"):
        detect("train", f"data={prepared}", *base, f"model={tmp_path / 'missing.pt'}")
    with pytest.raises(SiimError, match="weights not found"):
        detect("train", f"data={prepared}", *base, "model=yolov9000.pt")
    with pytest.raises(SiimError, match="unknown hyp preset"):
        detect("train", f"data={prepared}", *base, "hyp=nope")
    with pytest.raises(SiimError, match="run not found"):
        detect("predict", f"run={tmp_path / 'nope'}")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(SiimError, match="no trained fold"):
        detect("predict", f"run={tmp_path / 'empty_run'}")
    with pytest.raises(ConfigError, match="did you mean 'mixup'"):
        detect("train", f"data={prepared}", *base, "mixupp=0.2")
    with pytest.raises(ConfigError, match="valid modes: train, predict, evolve"):
        cli.main(["detect", "fit"])
    with pytest.raises(ConfigError, match="needs a mode"):
        cli.main(["detect", f"data={prepared}"])
    assert not (project / "errors" / "fold0").exists()  # nothing started


@pytest.mark.slow
def test_data_as_a_yaml_path_or_a_dataset_name(prepared):
    from siimcovid.detect import common

    yaml_path = Path(Prepared(prepared).cfg["data_yaml_dir"]) / "tiny_fold1.yaml"
    source = common.resolve_data(str(yaml_path), "data_yaml")
    assert common.select_folds("all", source) == [1]
    with pytest.raises(SiimError, match="fold 1"):
        common.select_folds(0, source)
    by_name = common.resolve_data("tiny", yaml_path.parent)  # data=<name>: data_yaml/<name>_fold<k>.yaml
    assert by_name.prepared == Path(prepared).resolve() and common.select_folds("all", by_name) == [0, 1, 2]
    assert by_name.yaml(2) == yaml_path.parent / "tiny_fold2.yaml"


@pytest.mark.slow
def test_cli_does_not_import_torch_for_other_stages():
    code = "import sys; from siimcovid import cli; cli.resolve(['synth', 'out=x']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_predict_refuses_a_run_whose_folds_changed(trained, tmp_path):
    from siimcovid.detect.predict import load_run

    copy = Path(shutil.copytree(trained, tmp_path / "moved", ignore=shutil.ignore_patterns("pred_*.csv")))
    cfg = yaml.safe_load((copy / "detect.yaml").read_text())
    assert cfg["learned"]["folds_id"] == Prepared(cfg["learned"]["prepared"]).folds_id
    cfg["learned"]["folds_id"] = "0123456789ab"  # trained on another fold assignment (prepare re-ran)
    (copy / "detect.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SiimError, match="trained on other folds"):
        load_run(copy)


@pytest.mark.slow
def test_a_truncated_checkpoint_is_a_clear_error(trained, tmp_path):
    copy = Path(shutil.copytree(trained / "fold0", tmp_path / "fold0"))
    last = copy / "weights" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # killed while saving
    with pytest.raises(SiimError, match="cannot be read"):
        fold_state(copy)


@pytest.mark.slow
def test_the_is_better_event_decides_the_detectors_best_checkpoint(prepared, project):
    """The classifier's checkpoint rule event, the same for the detector: the last rule given decides which epoch is
    best.pt (the first epoch's always is); it sees the epoch's metrics and the best so far."""
    from ultralytics.utils.patches import torch_load

    from siimcovid.config import load_config
    from siimcovid.detect.common import ultralytics_keys
    from siimcovid.detect.train import train

    overrides = dict(item.split("=", 1) for item in TINY)
    overrides.update(data=str(prepared), fold="0", epochs="3", project=str(project))
    seen, weights = [], {}
    for name, rule in (("first", lambda t, stats, best: False), ("last", lambda t, stats, best: True)):
        cfg = load_config("detect", [f"{k}={v}" for k, v in {**overrides, "name": name}.items()], extra_ok=ultralytics_keys())
        spy = lambda t, stats, best, rule=rule: seen.append((t.epoch, best["epoch"], "fitness" in stats)) or rule(t, stats, best)  # noqa: E731
        fold = train(cfg, callbacks={"is_better": spy}) / "fold0" / "weights"
        weights[name] = [torch_load(fold / f, map_location="cpu")["model"].state_dict() for f in ("best.pt", "last.pt")]
    same = lambda a, b: all(a[k].equal(b[k]) for k in a)  # noqa: E731
    assert not same(*weights["first"]) and same(*weights["last"])  # epoch 1 kept as best, or the last epoch
    assert [(e, f) for e, _, f in seen[:2]] == [(2, True), (3, True)]  # asked from the second epoch on, with the metrics
    assert seen[0][1] == 1  # the best so far: epoch 1

"""The binary none model (issue 20 item 1): classify train task=none, its table (tables.NONE_IMAGES), fuse none_cls=.

The training tests are slow (a tiny timm model at 64 px, one fold, one epoch); the fusion tests use hand-made tables
on the session's prepared folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_fuse import classifier, exact_detections, run, truth_images

from siimcovid.config import load_config
from siimcovid.tables import NONE_IMAGES, SCORES
from siimcovid.utils import SiimError

torch = pytest.importorskip("torch")

TINY = {"model": "test_efficientnet", "pretrained": False, "imgsz": 64, "batch": 8, "workers": 0, "device": "cpu"}
TINY |= {"drop_rate": 0.0, "drop_path_rate": 0.0, "epochs": 1, "fine_lr": [], "warmup_epochs": 0, "tracking": "none"}
DEFAULT_NONE_MODEL_WEIGHT = load_config("fuse").none_model_weight


def none_table(images, seed=0, folds=True) -> pd.DataFrame:
    """A none model's table: P(no box), noisy but informative, one row per image (its own fold out of fold)."""
    rng = np.random.default_rng(seed)
    empty = np.array([len(b) == 0 for b in images.boxes], float)
    none = 1 / (1 + np.exp(-(2 * (2 * empty - 1) + rng.normal(0, 1.5, len(images)))))
    out = pd.DataFrame({"model": "nonemodel", "image_id": images.image_id.to_numpy(), "study_id": images.study_id.to_numpy()})
    if folds:
        out["fold"] = images.fold.to_numpy()
    out["none"] = none
    return out


def fused_images(result) -> pd.DataFrame:
    return pd.read_csv(result["dir"] / "images_oof.csv", dtype={"image_id": str}).set_index("image_id")


# ----------------------------------------------------------------------------- the loss and the settings
def test_task_none_loss_is_the_none_bce_and_the_mask_loss_only():
    from siimcovid.classify.model import StudyLoss

    torch.manual_seed(0)
    out = {k: torch.randn(*s, requires_grad=True) for k, s in {"study": (4, 4), "none": (4,), "mask": (4, 1, 4, 4)}.items()}
    study, none = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 0.0, 0.0, 1.0])
    mask = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8)
    plain = StudyLoss.from_cfg(load_config("classify"))(out, study, none, mask)
    parts = StudyLoss.from_cfg(load_config("classify", {"task": "none"}))(out, study, none, mask)
    value = {k: float(v.detach()) for k, v in parts.items()}
    assert value["cls"] == pytest.approx(float(plain["cls"].detach()))  # still computed and logged
    assert value["loss"] == pytest.approx(float((plain["loss"] - plain["cls"]).detach()))
    parts["loss"].backward()
    assert (out["study"].grad == 0).all() and (out["none"].grad != 0).any()  # the study head learns nothing


@pytest.mark.parametrize(
    "settings, message",
    [({"none_head": False}, "none_head=true"), ({"none_weight": 0.0}, "none_weight > 0")],
)
def test_task_none_is_refused_without_the_none_head_or_its_weight(prepared, tmp_path, settings, message):
    from siimcovid.classify.train import main

    cfg = load_config("classify", {**TINY, "data": str(prepared), "project": str(tmp_path), "task": "none", **settings})
    with pytest.raises(SiimError, match=message):
        main(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything is written


# ----------------------------------------------------------------------------- fuse none_cls=
def oof_inputs(prepared, tmp_path, none_seed=0):
    images = truth_images(prepared, "oof")
    cls = classifier(images, seed=2, signal=1.0)
    cls.to_csv(tmp_path / "cls.csv", index=False)
    nones = none_table(images, seed=none_seed)
    NONE_IMAGES.write(nones, tmp_path / "pred_oof_none.csv")
    return images, cls.set_index("image_id"), nones.set_index("image_id")


def test_fuse_blends_the_none_model_into_the_classifier_side_by_none_model_weight(prepared, tmp_path):
    images, cls, nones = oof_inputs(prepared, tmp_path)
    base = [f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", f"none_cls={tmp_path / 'pred_oof_none.csv'}"]
    got = {w: fused_images(run([*base, f"none_model_weight={w}"], tmp_path, name=f"w{w}")) for w in (0.0, 0.3, 1.0)}
    ids = got[0.0].index
    classifiers, model = cls.loc[ids, "none"].to_numpy(), nones.loc[ids, "none"].to_numpy()
    assert got[0.0].none.to_numpy() == pytest.approx(classifiers)
    assert got[1.0].none.to_numpy() == pytest.approx(model)
    assert got[0.3].none.to_numpy() == pytest.approx(0.7 * classifiers + 0.3 * model)
    assert got[0.3].none_model.to_numpy() == pytest.approx(model)
    # a none model that knows more than the classifiers lifts AP(none)
    scores = {w: SCORES.read(tmp_path / "runs" / f"w{w}" / "scores_oof.csv").iloc[0]["none"] for w in got}
    assert scores[0.0] != scores[1.0]
    record = yaml.safe_load((tmp_path / "runs" / "w0.3" / "fusion.yaml").read_text())["oof"]
    assert [f["models"] for f in record["none_cls"]] == [["nonemodel"]] and record["params"]["none_model_weight"] == 0.3


def test_the_4th_place_none_formula_is_expressible(prepared, tmp_path):
    """none = p_neg^0.8 x (1 - p_opacity)^0.2: p_neg the none model's, p_opacity the best box's conf."""
    images, _, nones = oof_inputs(prepared, tmp_path)
    exact_detections(images, conf=0.7).to_csv(tmp_path / "det.csv", index=False)
    args = [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"none_cls={tmp_path / 'pred_oof_none.csv'}"]
    args += ["none_model_weight=1", "none_blend=geometric", "none_det=max", "none_cls_weight=0.8"]
    got = fused_images(run(args, tmp_path))
    p_neg = nones.loc[got.index, "none"].to_numpy()
    p_opacity = np.where(images.set_index("image_id").loc[got.index].boxes.map(len) > 0, 0.7, 0.0)
    assert got.none.to_numpy() == pytest.approx(p_neg**0.8 * (1 - p_opacity) ** 0.2)


def test_two_none_models_average_by_none_model_weights(prepared, tmp_path):
    images, _, first = oof_inputs(prepared, tmp_path)
    second = none_table(images, seed=5)
    NONE_IMAGES.write(second.assign(model="other"), tmp_path / "second.csv")
    files = f"none_cls={tmp_path / 'pred_oof_none.csv'},{tmp_path / 'second.csv'}"
    got = fused_images(run([f"data={prepared}", files, "none_model_weights=1,3"], tmp_path))
    expected = 0.25 * first.loc[got.index, "none"] + 0.75 * second.set_index("image_id").loc[got.index, "none"]
    assert got.none.to_numpy() == pytest.approx(expected.to_numpy())
    with pytest.raises(SiimError, match="none_model_weights has 1 value"):
        run([f"data={prepared}", files, "none_model_weights=2"], tmp_path, name="bad")


def test_fuse_tune_searches_none_model_weight(prepared, tmp_path):
    oof_inputs(prepared, tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"none_model_weight": [0.0, 0.5, 1.0]}))
    args = [f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", f"none_cls={tmp_path / 'pred_oof_none.csv'}"]
    from siimcovid import cli

    cli.main(["fuse", "tune", *args, f"space={space}", "trials=3", f"project={tmp_path / 'runs'}", "name=t", "workers=1"])
    trials = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv")
    assert set(trials.none_model_weight) == {0.0, 0.5, 1.0}
    assert trials.groupby("none_model_weight")["none"].first().nunique() > 1  # the weight moves AP(none)


def broken(table: pd.DataFrame, how: str, test_ids: list[str]) -> pd.DataFrame:
    if how == "range":
        return table.assign(none=np.where(np.arange(len(table)) == 3, 1.5, table.none))
    if how == "duplicate":
        return pd.concat([table, table.iloc[[2]]], ignore_index=True)
    if how == "nan":
        return table.assign(none=np.where(np.arange(len(table)) == 1, np.nan, table.none))
    if how == "fold":
        return table.assign(fold=(table.fold + 1) % 3)
    if how == "study":
        return table.assign(study_id=np.where(np.arange(len(table)) == 0, "someotherstudy", table.study_id))
    if how == "split":  # a test image in an out-of-fold table
        extra = table.iloc[[0]].assign(image_id=test_ids[0], fold=-1)
        return pd.concat([table, extra], ignore_index=True)
    if how == "empty":
        return table.iloc[:0]
    raise ValueError(how)


@pytest.mark.parametrize(
    "how, message",
    [
        ("range", r"none must be in \[0, 1\]"),
        ("duplicate", "duplicate"),
        ("nan", "not a finite number"),
        ("fold", "not out-of-fold"),
        ("study", "study_id someotherstudy"),
        ("split", "not a train .out-of-fold. image"),
        ("empty", "no rows"),
    ],
)
def test_a_malformed_none_table_is_refused_naming_the_file(prepared, tmp_path, how, message):
    from siimcovid.data.prepared import Prepared

    images = truth_images(prepared, "oof")
    test_ids = list(Prepared(prepared).split("test").image_id)
    bad = broken(none_table(images), how, test_ids)
    path = tmp_path / "hostile_none.csv"
    bad.to_csv(path, index=False)
    with pytest.raises(SiimError, match=message) as e:
        run([f"data={prepared}", f"none_cls={path}"], tmp_path)
    assert "hostile_none.csv" in str(e.value)


def test_a_test_none_table_must_cover_every_sample_image(prepared, tmp_path):
    images = truth_images(prepared, "test")
    table = none_table(images.assign(fold=-1))
    NONE_IMAGES.write(table.iloc[1:], tmp_path / "pred_test_none.csv")
    with pytest.raises(SiimError, match="pred_test_none.csv.*have no prediction|have no prediction.*pred_test_none.csv"):
        run([f"data={prepared}", "split=test", f"none_cls={tmp_path / 'pred_test_none.csv'}"], tmp_path)


# ----------------------------------------------------------------------------- train, predict, runs, fuse (slow)
@pytest.fixture(scope="module")
def none_run(prepared, tmp_path_factory):
    """Fold 0 of a task=none model, one epoch, then `classify predict` of it."""
    from siimcovid.classify.predict import main as predict
    from siimcovid.classify.train import main as train

    project = tmp_path_factory.mktemp("none_runs")
    settings = {**TINY, "data": str(prepared), "project": str(project), "name": "nm", "fold": 0, "task": "none"}
    results = train(load_config("classify", settings))
    written = predict(load_config("classify", {"run": str(project / "nm"), "workers": 0, "device": "cpu", "batch": 8}))
    return project / "nm", results, written


@pytest.mark.slow
def test_task_none_chooses_best_pt_by_ap_none_and_predicts_a_none_table(none_run, prepared):
    from siimcovid.classify.none import none_ap
    from siimcovid.data.prepared import Prepared

    run_dir, results, written = none_run
    log = pd.read_csv(run_dir / "fold0" / "results.csv")
    assert "val_none_ap" in log and log.best.any()
    best = log[log.best].iloc[-1]
    assert results[0]["best_score"] == pytest.approx(best.val_none_ap)
    ckpt = torch.load(run_dir / "fold0" / "best.pt", map_location="cpu", weights_only=False)
    assert ckpt["score"] == pytest.approx(best.val_none_ap)
    # predict: the none table of the contract (no study tables), scored on AP(none) alone
    assert written["nm"]["oof"].name == "pred_oof_none.csv" and not (run_dir / "pred_oof_image.csv").exists()
    oof, test = NONE_IMAGES.read(run_dir / "pred_oof_none.csv"), NONE_IMAGES.read(run_dir / "pred_test_none.csv")
    prep = Prepared(prepared)
    assert sorted(oof.image_id) == sorted(prep.fold(0, "val").image_id) and (test.fold == -1).all()
    scores = SCORES.read(run_dir / "scores_oof.csv")
    assert "typical" not in scores and scores.iloc[0]["none"] == pytest.approx(none_ap(prep, oof))


@pytest.mark.slow
def test_a_none_run_in_siimcovid_runs_and_in_fuse(none_run, prepared, tmp_path):
    from siimcovid.classify.summary import describe

    run_dir, _, _ = none_run
    row = describe(run_dir)
    assert row["cv"].startswith("AP(none)") and "task=none" in row["settings"]
    images = truth_images(prepared, "oof")
    classifier(images, seed=2, signal=1.0).to_csv(tmp_path / "cls.csv", index=False)
    args = [f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", f"none_cls={run_dir / 'pred_oof_none.csv'}"]
    got = fused_images(run([*args, "none_model_weight=1"], tmp_path))
    oof = NONE_IMAGES.read(run_dir / "pred_oof_none.csv").set_index("image_id")
    assert sorted(got.index) == sorted(oof.index)  # the images both predicted: fold 0's
    assert got.none.to_numpy() == pytest.approx(oof.loc[got.index, "none"].to_numpy())


@pytest.mark.slow
def test_a_none_run_resumed_as_a_study_classifier_is_refused(none_run, prepared):
    from siimcovid.classify.train import main as train

    run_dir, _, _ = none_run
    cfg = {**TINY, "data": str(prepared), "project": str(run_dir.parent), "name": run_dir.name, "fold": 0}
    with pytest.raises(SiimError, match="task"):
        train(load_config("classify", cfg))


@pytest.mark.slow
def test_a_none_run_is_not_a_member_of_a_classifier_ensemble(none_run):
    from siimcovid.classify.predict import main as predict

    run_dir, _, _ = none_run
    with pytest.raises(SiimError, match="none model"):
        predict(load_config("classify", {"run": [str(run_dir), str(run_dir)], "workers": 0, "device": "cpu"}))


@pytest.mark.slow
def test_export_and_predict_carry_the_none_model(none_run, prepared, synth_root, tmp_path):
    """The none model goes into a bundle as a classify member of task none (fuse.yaml's none_cls) and predict fuses
    its none as the run's own `fuse split=test none_cls=` did."""
    from siimcovid.cli import call

    run_dir, _, _ = none_run
    args = [f"data={prepared}", "split=test", f"none_cls={run_dir / 'pred_test_none.csv'}", "none_model_weight=1"]
    fused = run(args, tmp_path, name="nf")
    settings = {"project": str(tmp_path / "runs"), "classify": str(run_dir), "fuse": str(fused["dir"])}
    bundle = call("export", **settings, out=str(tmp_path / "b"))
    fusion = yaml.safe_load((bundle / "fuse.yaml").read_text())
    assert fusion["none_cls"] == ["nm"] and fusion["cls"] == [] and fusion["none_model_weight"] == 1
    assert yaml.safe_load((bundle / "classify" / "nm" / "settings.yaml").read_text())["task"] == "none"
    result = call("predict", bundle=str(bundle), source=str(synth_root), out=str(tmp_path / "out"), workers=0)
    table = NONE_IMAGES.read(result["out"] / "classify" / "nm" / "pred_test_none.csv").set_index("image_id")
    images = pd.read_csv(result["fused"]["dir"] / "images_test.csv", dtype={"image_id": str}).set_index("image_id")
    assert images.none.to_numpy() == pytest.approx(table.loc[images.index, "none"].to_numpy())  # none_model_weight=1
    # the run's own predict on the images the bundle prepared: the same none, image for image
    from siimcovid.classify.predict import main as predict

    copy = shutil.copytree(run_dir, tmp_path / "nm")  # the module's run keeps its own tables
    settings = {"run": str(copy), "split": ["test"], "source": str(result["prepared"]), "workers": 0, "device": "cpu"}
    predict(load_config("classify", settings))
    own = NONE_IMAGES.read(copy / "pred_test_none.csv").set_index("image_id")
    assert sorted(own.index) == sorted(table.index)
    assert table.loc[own.index, "none"].to_numpy() == pytest.approx(own.none.to_numpy(), rel=1e-6)
    # a bundle that lists its none model as a study classifier is refused when opened
    from siimcovid.bundle import open_bundle
    from siimcovid.utils import file_sha256

    tampered = Path(shutil.copytree(bundle, tmp_path / "tampered"))
    (tampered / "fuse.yaml").write_text(yaml.safe_dump({**fusion, "cls": ["nm"], "none_cls": []}))
    manifest = yaml.safe_load((tampered / "manifest.yaml").read_text())
    entry = manifest["files"]["fuse.yaml"]
    entry["sha256"] = file_sha256(tampered / "fuse.yaml")
    entry |= {k: (tampered / "fuse.yaml").stat().st_size for k in ("bytes", "size") if k in entry}
    (tampered / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    with pytest.raises(SiimError, match="classify/nm/settings.yaml says task none, but fuse.yaml lists it in cls"):
        open_bundle(tampered)


def test_fuse_tune_spends_no_trial_on_none_model_weight_without_none_files(prepared, tmp_path):
    oof_inputs(prepared, tmp_path)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"none_model_weight": [0.0, 1.0], "none_cls_weight": [0.5, 1.0]}))
    from siimcovid import cli

    args = [f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", f"space={space}", "trials=3"]
    cli.main(["fuse", "tune", *args, f"project={tmp_path / 'runs'}", "name=t", "workers=1"])
    trials = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv")
    assert set(trials.none_model_weight) == {DEFAULT_NONE_MODEL_WEIGHT}

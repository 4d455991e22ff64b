"""det_scale: a per-member factor of a detector's box confidences before WBF (the 1st place's 0.78 for Faster R-CNN),
searched by `fuse tune`, recorded in fusion.yaml, carried by `export` into a bundle and by `predict` into its fusion.

No training: the detection tables are built here (tables.DETECTIONS), on the session's prepared synthetic data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from test_bundle import export, fake_fuse_run, runs, yolo_checkpoint  # noqa: F401  (fixtures: a project of runs)

from siimcovid import cli
from siimcovid.config import Config, load_config
from siimcovid.data.prepared import Prepared
from siimcovid.data.truth import load_truth
from siimcovid.utils import SiimError

DET = ["image_id", "model", "fold", "x_min", "y_min", "x_max", "y_max", "conf"]


def truth_images(prepared, part="train"):
    """Per-image truth (unclipped boxes) with original sizes and folds."""
    meta = Prepared(prepared).split(part)[["image_id", "fold", "rows", "cols"]]
    return load_truth(prepared, part).drop(columns=["fold"]).merge(meta, on="image_id")


def true_boxes(images, model, conf, folds=None) -> pd.DataFrame:
    """The true boxes as one model's predictions, conf[i] for the i-th box (out of fold: each image by its own fold's
    model; folds given: by each of those folds' models, as on test)."""
    boxes = [(r, b) for r in images.itertuples() for b in r.boxes]
    conf = np.broadcast_to(np.asarray(conf, dtype=np.float64), (len(boxes),))
    rows = [(r.image_id, model, k, *b, c) for (r, b), c in zip(boxes, conf) for k in ([r.fold] if folds is None else folds)]
    return pd.DataFrame(rows, columns=DET)


def fuse(tmp_path, prepared, files, name, *settings, split="oof"):
    det = ",".join(str(f) for f in files)
    args = ["fuse", f"split={split}", f"data={prepared}", f"det={det}", f"project={tmp_path / 'runs'}", f"name={name}"]
    return cli.main([*args, "workers=1", *settings])


# ----------------------------------------------------------------------------- the scale, applied
def test_det_scale_multiplies_each_members_confidences_clipped_at_1(prepared, tmp_path):
    images = truth_images(prepared)
    n = sum(len(b) for b in images.boxes)
    conf = np.where(np.arange(n) % 2 == 0, 0.3, 0.6)
    true_boxes(images, "a", conf).to_csv(tmp_path / "a.csv", index=False)
    plain = fuse(tmp_path, prepared, [tmp_path / "a.csv"], "plain")["fused"]
    doubled = fuse(tmp_path, prepared, [tmp_path / "a.csv"], "doubled", "det_scale=2")["fused"]
    assert np.sort(plain.boxes.wbf_conf) == pytest.approx(np.sort(conf))  # one member, boxes apart: WBF keeps conf
    assert np.sort(doubled.boxes.wbf_conf) == pytest.approx(np.sort(np.minimum(2 * conf, 1.0)))  # 0.6, and 1.2 -> 1
    # the detector's none is computed from the scaled confidences: prod(1 - conf) over an image's fused boxes
    by_image = doubled.boxes.groupby("image_id").wbf_conf.apply(lambda c: np.prod(1 - c))
    none_det = doubled.images.set_index("image_id").none_det
    assert none_det[by_image.index].to_numpy() == pytest.approx(by_image.to_numpy())
    assert (none_det[doubled.images.n_boxes.to_numpy() == 0] == 1).all()

    # per member: a's boxes halved, b's kept; WBF's avg of the two (the same boxes) is (0.5 * 0.8 + 0.8) / 2
    true_boxes(images, "a", 0.8).to_csv(tmp_path / "a8.csv", index=False)
    true_boxes(images, "b", 0.8).to_csv(tmp_path / "b8.csv", index=False)
    two = [tmp_path / "a8.csv", tmp_path / "b8.csv"]
    per_file = fuse(tmp_path, prepared, two, "per_file", "det_scale=0.5,1")["fused"]
    assert per_file.boxes.wbf_conf.to_numpy() == pytest.approx(np.full(n, 0.6))
    (tmp_path / "scale.yaml").write_text("det_scale: {a: 0.5}\n")  # per model, as det_weights: b, not named, is 1
    per_model = fuse(tmp_path, prepared, two, "per_model", f"cfg={tmp_path / 'scale.yaml'}")["fused"]
    pd.testing.assert_frame_equal(per_model.boxes, per_file.boxes)


def test_det_scale_on_test_keeps_the_fold_by_fold_none_on_the_scaled_confidences(prepared, tmp_path):
    """On test every fold's model sees every image; none_det is computed per fold (as out of fold), on the scaled
    confidences: each fold's lone box of conf 0.3 * 2 gives none 0.4 per box."""
    images = truth_images(prepared, "test")
    true_boxes(images, "a", 0.3, folds=[0, 1, 2]).to_csv(tmp_path / "test.csv", index=False)
    fused = fuse(tmp_path, prepared, [tmp_path / "test.csv"], "test", "det_scale=2", split="test")["fused"]
    expected = images.set_index("image_id").boxes.map(len).rpow(0.4)
    got = fused.images.set_index("image_id").none_det
    assert got[expected.index].to_numpy() == pytest.approx(expected.to_numpy())


def test_det_scale_values_are_checked(prepared, tmp_path):
    from siimcovid.fuse.tune import check_space

    images = truth_images(prepared)
    true_boxes(images, "a", 0.5).to_csv(tmp_path / "a.csv", index=False)
    files = [tmp_path / "a.csv"]
    with pytest.raises(SiimError, match=r"det_scale=0: expected list\[float > 0\]"):  # fuse.yaml's spec: > 0
        fuse(tmp_path, prepared, files, "zero", "det_scale=0")
    with pytest.raises(SiimError, match="det_scale has 2 value"):
        fuse(tmp_path, prepared, files, "two", "det_scale=1,2")
    for bad, match in (("{yolo: 2}", r"det_scale names model\(s\) \['yolo'\]"), ("{a: -1}", "numbers > 0"),
                       ("{a: true}", "numbers > 0"), ("{a: x}", "numbers > 0")):  # fmt: skip
        (tmp_path / "bad.yaml").write_text(f"det_scale: {bad}\n")  # a mapping: its values checked by fuse itself
        with pytest.raises(SiimError, match=match):
            fuse(tmp_path, prepared, files, "bad", f"cfg={tmp_path / 'bad.yaml'}")
    with pytest.raises(SiimError, match=r"space: det_scale: .*det_scale=\[0\]"):
        check_space({"det_scale": [1.0, 0]})


# ----------------------------------------------------------------------------- tune: a case built to need it
def overconfident_pair(prepared, folder):
    """Two detectors on the OOF images. a: finds every true box, a little off (4% of its width), with modest, graded
    confidences (0.3..0.6). b: well located (exact boxes) but finds only every other true box, and on every empty
    image puts a false positive at 0.8 that WBF keeps alone. Unscaled, b's false positives (0.8 / 2 after WBF's avg
    over 2 members) outrank every true box only a found (<= 0.6 / 2), and make empty images look less empty to the
    detector's none than a's boxes do; scaled down (b at 0.5: 0.2), they sink below them. Scaling b up cannot help
    (its false positives only grow, to 1 at most), nor can scaling a up within the space (a's best, 0.6 * 1.25, stays
    below 0.8)."""
    images = truth_images(prepared)
    boxes = [(r, b) for r in images.itertuples() for b in r.boxes]
    a, b = [], []
    for k, ((r, box), conf) in enumerate(zip(boxes, np.linspace(0.3, 0.6, len(boxes)))):
        x1, y1, x2, y2 = box
        shift = 0.04 * (x2 - x1)
        a.append((r.image_id, "a", r.fold, x1 + shift, y1, x2 + shift, y2, conf))
        if k % 2 == 0:
            b.append((r.image_id, "b", r.fold, x1, y1, x2, y2, 0.9))
    for r in images.itertuples():
        if not r.boxes:
            b.append((r.image_id, "b", r.fold, 0.3 * r.cols, 0.3 * r.rows, 0.6 * r.cols, 0.6 * r.rows, 0.8))
    paths = [folder / "det_a.csv", folder / "det_b.csv"]
    for rows, path in zip((a, b), paths):
        pd.DataFrame(rows, columns=DET).to_csv(path, index=False)
    return paths


def test_fuse_tune_finds_a_det_scale_below_1_for_the_overconfident_member(prepared, tmp_path):
    from siimcovid.fuse.record import FUSION_RECORD

    files = overconfident_pair(prepared, tmp_path)
    space = {"det_scale": load_config("fuse").space["det_scale"]}  # the default candidates (0.5 .. 1.25), nothing else
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"space": space}))
    det = ",".join(map(str, files))
    result = cli.main(["fuse", "tune", f"data={prepared}", f"det={det}", f"cfg={tmp_path / 'space.yaml'}", "trials=6"]
                      + [f"project={tmp_path / 'runs'}", "name=t", "workers=1", "seed=0"])  # fmt: skip
    scale_a, scale_b = result["best"]["det_scale"]
    assert scale_b <= 0.65 and scale_b < scale_a  # b, over-confident, discounted: clearly below 1 and below a
    assert result["best_score"] > result["default_score"] + 0.01  # untuned: det_scale [] (1 each)
    tried = result["trials"].det_scale.astype(str)
    assert {s.split(",")[0] for s in tried if s} > {"1.0"}  # the first member is searched too (absolute confidences)

    out = tmp_path / "runs" / "t"
    assert FUSION_RECORD.read(out / "fusion.yaml")["tune"]["params"]["det_scale"] == [scale_a, scale_b]  # export reads it
    assert yaml.safe_load((out / "best.yaml").read_text())["det_scale"] == [scale_a, scale_b]
    again = fuse(tmp_path, prepared, files, "again", f"cfg={out / 'best.yaml'}")  # best.yaml reproduces its score
    assert again["score"].final == pytest.approx(result["best_score"])
    untuned = fuse(tmp_path, prepared, files, "untuned")
    assert untuned["score"].final == pytest.approx(result["default_score"])


# ----------------------------------------------------------------------------- export, bundle, predict
def test_export_carries_det_scale_into_the_bundle_and_predicts_fusion(runs, prepared, tmp_path):  # noqa: F811
    from siimcovid.bundle import open_bundle
    from siimcovid.predict.stage import fuse_config

    fake_fuse_run(runs, "scaled", [runs / "detect/v5b", runs / "detect/v5a"], [runs / "classify/b3"], prepared,
                  det_scale=[0.78, 1.1])  # fmt: skip
    given = {"detect": [str(runs / "detect/v5a"), str(runs / "detect/v5b")], "classify": [str(runs / "classify/b3")]}
    opened = open_bundle(export(runs, **given, fuse=str(runs / "fuse/scaled"), out=str(tmp_path / "b")))
    assert [m.name for m in opened.detectors] == ["v5b", "v5a"] and opened.fusion["det_scale"] == [0.78, 1.1]
    cfg = fuse_config(opened, Prepared(prepared), [tmp_path / "v5b.csv", tmp_path / "v5a.csv"], [tmp_path / "b3.csv"],
                      tmp_path / "sample.csv", tmp_path / "out", Config(overwrite=False, workers=0))  # fmt: skip
    assert cfg.det_scale == [0.78, 1.1]  # predict fuses its members' tables with the bundle's scales

    unscaled = open_bundle(export(runs, pipeline="x", out=str(tmp_path / "x")))
    assert unscaled.fusion["det_scale"] == []  # fused without it: 1 for every member


def test_a_record_without_det_scale_means_1_and_export_checks_per_member_settings(tmp_path):
    from siimcovid.bundle.fusion import check_member_settings, from_record
    from siimcovid.fuse.record import FORMAT, FUSION_RECORD

    params = {k: v for k, v in load_config("fuse").items() if k in ("iou_thr", "det_weights")}  # an older record's
    entry = {"split": "test", "data": "d", "folds": "all", "det": [], "cls": [], "params": params}
    path = tmp_path / "fusion.yaml"
    path.write_text(yaml.safe_dump({"format": FORMAT, "test": entry}))
    assert FUSION_RECORD.read(path)["test"]["params"]["det_scale"] == []

    class Named:  # a member as fused_models compares it: by name
        def __init__(self, name):
            self.name = name

    sha = "0" * 64
    two_models = {**entry, "det": [{"file": "both.csv", "sha256": sha, "models": ["y", "f"]}],
                  "params": {**FUSION_RECORD.read(path)["test"]["params"], "det_scale": [0.78]}}  # fmt: skip
    out = from_record(two_models, [Named("y"), Named("f")], [], path)
    assert out["det_scale"] == {"y": 0.78, "f": 0.78} and out["det"] == ["y", "f"]  # one file of two models: per model

    fine = {"det": ["y", "f"], "cls": ["c"], "det_scale": {"f": 0.78}, "det_weights": [2.0, 1.0], "cls_weights": []}
    check_member_settings(fine, "bundle b")
    for bad, match in (({"det_scale": [0.5]}, r"det_scale=\[0\.5\] do not match its 2 members"),
                       ({"det_scale": {"z": 1.0}}, r"det_scale names \['z'\]"),
                       ({"det_scale": {"f": 0}}, "number > 0"), ({"det_scale": {"f": "x"}}, "number > 0"),
                       ({"det_scale": {"f": float("inf")}}, "number > 0"), ({"det_weights": {"f": -1}}, "number > 0"),
                       ({"cls_weights": [1.0, 2.0]}, "cls_weights")):  # fmt: skip
        with pytest.raises(SiimError, match=match):
            check_member_settings({**fine, **bad}, "bundle b")

"""Fusion: WBF, the box round trip, the none formulas, the stage on OOF and test, and tune."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid import cli
from siimcovid.config import load_config
from siimcovid.data.siim import STUDY_CLASSES
from siimcovid.data.truth import load_truth
from siimcovid.fuse import formulas, pipeline
from siimcovid.fuse.inputs import FuseInputs
from siimcovid.fuse.pipeline import FUSION_KEYS
from siimcovid.fuse.wbf import denormalise_boxes, normalise_boxes, wbf_image, wbf_table
from siimcovid.submission import read_submission, sample_ids
from siimcovid.utils import DataError, SiimError

DET = ["image_id", "model", "fold", "x_min", "y_min", "x_max", "y_max", "conf"]
DEFAULTS = load_config("fuse")


# ----------------------------------------------------------------------------- synthetic predictions
def truth_images(prepared, split):
    """Per-image truth of a split (unclipped boxes) with original sizes and folds."""
    from siimcovid.data.prepared import Prepared

    meta = Prepared(prepared).split("train" if split == "oof" else "test")[["image_id", "fold", "rows", "cols"]]
    truth = load_truth(prepared, "train" if split == "oof" else "test")
    return truth.drop(columns=["fold"]).merge(meta, on="image_id")


def exact_detections(images, models=("m1",), folds=None, conf=0.9):
    """The true boxes as predictions: one set per model (and per fold when `folds` is given)."""
    rows = []
    for m in models:
        for rec in images.itertuples():
            for k in [rec.fold] if folds is None else folds:
                rows += [(rec.image_id, m, k, *b, conf) for b in rec.boxes]
    return pd.DataFrame(rows, columns=DET)


def noisy_detections(images, models=("m1", "m2"), seed=0):
    """Jittered true boxes (some missed) plus random false positives, as a detector would give."""
    rng = np.random.default_rng(seed)
    rows = []
    for m in models:
        for rec in images.itertuples():
            for b in rec.boxes:
                if rng.random() < 0.2:
                    continue
                w, h = b[2] - b[0], b[3] - b[1]
                x1, y1, x2, y2 = np.asarray(b) + rng.normal(0, 0.12, 4) * [w, h, w, h]
                rows.append(
                    (rec.image_id, m, rec.fold, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), rng.uniform(0.1, 0.9))
                )
            for _ in range(int(rng.integers(0, 3))):
                cx, cy, w, h = rng.uniform(0.3, 0.7) * rec.cols, rng.uniform(0.3, 0.7) * rec.rows, 0.2 * rec.cols, 0.25 * rec.rows
                rows.append((rec.image_id, m, rec.fold, cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, rng.uniform(0.05, 0.7)))
    return pd.DataFrame(rows, columns=DET)


def classifier(images, seed=0, signal=None):
    """Probabilities: signal=None gives near-certain correct ones; a number, noisy correlated ones."""
    rng = np.random.default_rng(seed)
    onehot = np.stack([(images.study_label == c).to_numpy(float) for c in STUDY_CLASSES], 1)
    empty = np.array([len(b) == 0 for b in images.boxes], float)
    if signal is None:
        probs, none = 0.01 + 0.96 * onehot, 0.01 + 0.98 * empty
    else:
        logits = signal * onehot + rng.normal(0, 1, onehot.shape)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        none = 1 / (1 + np.exp(-(signal * (2 * empty - 1) + rng.normal(0, 1.5, len(images)))))
    out = pd.DataFrame(probs, columns=STUDY_CLASSES)
    out.insert(0, "study_id", images.study_id.to_numpy())
    out.insert(0, "image_id", images.image_id.to_numpy())
    out["none"] = none
    return out


def run(args, tmp_path, name="exp"):
    return cli.main(["fuse", *args, f"project={tmp_path / 'runs'}", f"name={name}", "workers=1"])


# ----------------------------------------------------------------------------- WBF and boxes
def grid_boxes(n, rng):
    """n boxes on a 4 x 4 grid of cells (no two overlap), normalised, with random scores."""
    cells = rng.choice(16, n, replace=False)
    x, y = (cells % 4) / 4, (cells // 4) / 4
    boxes = np.stack([x + 0.02, y + 0.03, x + 0.2, y + 0.22], 1)
    return boxes, rng.uniform(0.01, 1, n)


@pytest.mark.parametrize("conf_type", ["avg", "max", "box_and_model_avg", "absent_model_aware_avg"])
def test_wbf_of_two_identical_sets_equals_either(conf_type):
    rng = np.random.default_rng(1)
    boxes, scores = grid_boxes(7, rng)
    fused_b, fused_s = wbf_image([boxes, boxes], [scores, scores], [1, 1], iou_thr=0.6, skip_box_thr=0.0, conf_type=conf_type)
    order = np.argsort(-scores)
    np.testing.assert_allclose(fused_s, scores[order], atol=1e-6)
    np.testing.assert_allclose(fused_b, boxes[order], atol=1e-6)  # ensemble-boxes keeps boxes in float32


def test_wbf_counts_a_member_that_found_nothing():
    """Test split: a box seen by 2 of 3 fold models keeps 2/3 of its mean confidence (conf_type avg)."""
    box = np.array([[0.1, 0.2, 0.4, 0.6]])
    _, scores = wbf_image([box, box, np.zeros((0, 4))], [[0.9], [0.6], []], conf_type="avg")
    assert scores == pytest.approx([0.75 * 2 / 3])
    _, alone = wbf_image([box, box], [[0.9], [0.6]], conf_type="avg")
    assert alone == pytest.approx([0.75])


def test_boxes_survive_the_round_trip_on_non_square_images():
    rows, cols = 2544, 3028  # the real median original, rows x cols
    px = np.array([[0, 0, cols, rows], [694.25, 1024.5, 1320.75, 2267.125], [2190, 902, 2911, 2356]])
    norm = normalise_boxes(px, rows, cols)
    np.testing.assert_array_equal(norm[0], [0, 0, 1, 1])  # x by cols, y by rows
    assert norm[1] == pytest.approx([694.25 / cols, 1024.5 / rows, 1320.75 / cols, 2267.125 / rows])
    np.testing.assert_allclose(denormalise_boxes(norm, rows, cols), px, rtol=0, atol=1e-9)
    # per-box sizes (two images of different shapes in one call)
    two = normalise_boxes(px[1:], [rows, 900], [cols, 3100])
    np.testing.assert_allclose(
        denormalise_boxes(two, [rows, 900], [cols, 3100]), np.minimum(px[1:], [[cols, rows, cols, rows], [3100, 900, 3100, 900]])
    )
    assert normalise_boxes([[-40, -5, 100, 3000]], rows, cols)[0] == pytest.approx([0, 0, 100 / cols, 1])  # clipped


def test_wbf_table_maps_fused_boxes_back_to_original_pixels():
    """Two identical members on two non-square images: the fused boxes are the input boxes, in px."""
    sizes = pd.DataFrame({"image_id": ["wide", "tall"], "rows": [1000, 3000], "cols": [3000, 1000]})
    boxes = pd.DataFrame(
        [
            ("wide", 100.0, 200.0, 900.0, 700.0, 0.8),
            ("wide", 2000.0, 100.0, 2900.0, 950.0, 0.4),
            ("tall", 50.0, 1200.0, 950.0, 2950.0, 0.7),
        ],
        columns=["image_id", "x_min", "y_min", "x_max", "y_max", "conf"],
    )
    both = pd.concat([boxes.assign(set=0), boxes.assign(set=1)], ignore_index=True)
    fused = wbf_table(both, sizes, n_sets=2)
    expected = boxes.sort_values(["image_id", "conf"], ascending=[False, False])
    np.testing.assert_allclose(
        fused[["x_min", "y_min", "x_max", "y_max"]], expected[["x_min", "y_min", "x_max", "y_max"]], atol=1e-3
    )
    assert list(fused.image_id) == ["wide", "wide", "tall"]
    assert fused.conf.to_numpy() == pytest.approx(expected.conf.to_numpy())


# ----------------------------------------------------------------------------- the formulas
def test_none_formulas_on_hand_cases():
    conf, image = [0.5, 0.2, 1.0], [0, 0, 2]  # image 1 has no box
    assert formulas.none_from_detector(conf, image, 3, "prod") == pytest.approx([0.5 * 0.8, 1.0, 0.0])
    assert formulas.none_from_detector(conf, image, 3, "max") == pytest.approx([0.5, 1.0, 0.0])
    assert formulas.none_from_classifier([0.3, 0.6]) == pytest.approx([0.3, 0.6])  # P(negative)
    assert formulas.none_from_classifier([0.3, 0.6], none=[0.1, 0.9]) == pytest.approx([0.1, 0.9])  # the none head wins
    assert formulas.blend_none([0.8], [0.4], 0.25, "linear") == pytest.approx([0.25 * 0.8 + 0.75 * 0.4])
    assert formulas.blend_none([0.8], [0.2], 0.5, "geometric") == pytest.approx([0.4])
    assert formulas.blend_none([0.8, 0.3], [0.0, 0.1], 1.0, "geometric") == pytest.approx([0.8, 0.3])  # w=1: classifier alone
    assert formulas.blend_none([0.8], [0.1], 0.0, "linear") == pytest.approx([0.1])
    assert formulas.reweight_opacity([0.8, 0.8], [0.75, 1.0], 2.0) == pytest.approx([0.8 * 0.25**2, 0.0])
    assert formulas.reweight_opacity([0.8], [1.0], 0.0) == pytest.approx([0.8])  # a=0: off, even where none=1
    assert formulas.negative_from_none([0.2], [0.6], 0.5) == pytest.approx([0.4])
    with pytest.raises(SiimError, match="none_det"):
        formulas.none_from_detector(conf, image, 3, "mean")
    params = {k: DEFAULTS[k] for k in FUSION_KEYS}
    with pytest.raises(SiimError, match=r"none_cls_weight=1.5: expected float 0\.\.1"):  # fuse.yaml's spec
        pipeline.check_params({**params, "none_cls_weight": 1.5})
    with pytest.raises(SiimError, match="opacity_exponent=-1.0: expected float >= 0"):
        pipeline.check_params({**params, "opacity_exponent": -1.0})
    with pytest.raises(SiimError, match="none_blend='mean': expected one of linear, geometric"):
        pipeline.check_params({**params, "none_blend": "mean"})
    with pytest.raises(SiimError, match=r"fusion parameters lack \['conf_type'\]"):
        pipeline.check_params({k: v for k, v in params.items() if k != "conf_type"})


def member_inputs(*members):
    """FuseInputs of three images with only classifier members (each an (n, 1) array: P(negative), the rest 0)."""
    images = pd.DataFrame({"image_id": ["a", "b", "c"], "study_id": ["a", "b", "c"], "fold": 0, "rows": 10, "cols": 10})
    frames = [
        pd.DataFrame({"negative": m[:, 0], "typical": 0.0, "indeterminate": 0.0, "atypical": 0.0, "none": m[:, 0]})
        for m in members
    ]
    return FuseInputs(
        split="oof", images=images, study_ids=["a", "b", "c"], boxes=pd.DataFrame(), sets=pd.DataFrame(), members=frames
    )


def test_classifier_members_combine_by_cls_ensemble_and_cls_weights():
    a, b = np.array([[0.2], [0.9], [0.5]]), np.array([[0.8], [0.1], [0.6]])
    params = {k: DEFAULTS[k] for k in FUSION_KEYS}
    mean = pipeline.classifier_table(member_inputs(a, b), {**params, "cls_weights": [3, 1]})
    assert mean[:, 0] == pytest.approx([0.35, 0.7, 0.525])
    geo = pipeline.classifier_table(member_inputs(a, b), {**params, "cls_ensemble": "geometric"})
    assert geo[:, 0] == pytest.approx([0.4, 0.3, np.sqrt(0.3)])
    c = np.array([[0.8], [0.6], [0.1]])  # percentile ranks: a -> 1/3, 1, 2/3; c -> 1, 2/3, 1/3
    rank = pipeline.classifier_table(member_inputs(a, c), {**params, "cls_ensemble": "rank", "cls_weights": [3, 1]})
    assert rank[:, 0] == pytest.approx([(1 + 1) / 4, (3 + 2 / 3) / 4, (2 + 1 / 3) / 4])
    with pytest.raises(SiimError, match="cls_ensemble='median': expected one of mean, geometric, geomean, rank"):
        pipeline.run_fusion(member_inputs(a, b), {**params, "cls_ensemble": "median"})  # parameters from Python: checked
    with pytest.raises(SiimError, match="cls_weights"):
        pipeline.classifier_table(member_inputs(a, b), {**params, "cls_weights": [1, 1, 1]})
    headless = member_inputs(a)
    headless.members[0]["none"] = np.nan  # a file without a none column
    with pytest.raises(SiimError, match=r"none_source=none but classifier member 0 has no `none` column"):
        pipeline.classifier_table(headless, {**params, "none_source": "none"})


def test_tune_checks_every_candidate_of_its_space_against_fuse_yaml():
    from siimcovid.fuse.tune import check_space

    check_space({"iou_thr": [0.5, 0.7], "det_weights": [0.5, 2.0], "cls_ensemble": ["rank"]})  # fine
    with pytest.raises(SiimError, match=r"space: iou_thr: fuse setting iou_thr=1.5: expected float 0\.\.1"):
        check_space({"iou_thr": [0.5, 1.5]})
    with pytest.raises(SiimError, match=r"space: det_weights: .*det_weights=\[0\]"):
        check_space({"det_weights": [1.0, 0]})  # a relative member weight must be > 0


def test_study_probabilities_average_images_and_borrow_none():
    images = pd.DataFrame(
        {
            "study_id": ["s", "s", "t"],
            "negative": [0.2, 0.4, 0.5],
            "typical": [0.8, 0.6, 0.5],
            "indeterminate": 0.0,
            "atypical": 0.0,
            "none": [0.9, 0.5, 0.1],
        }
    )
    out = formulas.study_probabilities(images, 0.5).set_index("study_id")
    assert out.loc["s", "typical"] == pytest.approx(0.7)
    assert out.loc["s", "negative"] == pytest.approx(0.5 * 0.3 + 0.5 * 0.7)
    assert out.loc["t", "negative"] == pytest.approx(0.5 * 0.5 + 0.5 * 0.1)


# ----------------------------------------------------------------------------- the stage
def test_fuse_oof_scores_a_constructed_case(prepared, tmp_path):
    """Perfect classifier and boxes plus ONE confident false positive on an empty image.

    With n true boxes, the FP ranks first: AP(opacity) = n / (n + 1) (VOC envelope), the other
    classes 1. With opacity_exponent=1 the classifier's none (0.99 there) sinks it: AP(opacity)
    rises to 1. The OOF submission, scored by `siimcovid evaluate`, gives the same final."""
    images = truth_images(prepared, "oof")
    det = exact_detections(images, models=("m1", "m2"))
    empty = images[[len(b) == 0 for b in images.boxes]].iloc[0]
    fp = pd.DataFrame([(empty.image_id, m, empty.fold, 10.0, 10.0, 60.0, 80.0, 0.95) for m in ("m1", "m2")], columns=DET)
    pd.concat([det, fp]).to_csv(tmp_path / "det.csv", index=False)
    classifier(images).to_csv(tmp_path / "cls.csv", index=False)
    args = [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=oof"]

    n = sum(len(b) for b in images.boxes)
    plain = run(args, tmp_path, "plain")["score"]
    assert plain.ap["opacity"] == pytest.approx(n / (n + 1))
    assert all(v == pytest.approx(1.0) for k, v in plain.ap.items() if k != "opacity")
    sunk = run([*args, "opacity_exponent=1"], tmp_path, "sunk")["score"]
    assert sunk.ap["opacity"] == pytest.approx(1.0)

    out = tmp_path / "runs" / "plain"
    report = json.loads((out / "scores_oof.json").read_text())
    assert report["final"] == pytest.approx(plain.final)
    folds = pd.read_csv(out / "scores_oof.csv")
    assert set(folds.fold.astype(str)) == {"all", "0", "1", "2"}
    assert folds.loc[folds.fold.astype(str) == "all", "n_images"].item() == len(images)
    again = cli.main(["evaluate", f"submission={out / 'oof_submission.csv'}", f"data={prepared}"])
    assert again.final == pytest.approx(plain.final, abs=1e-9)
    saved = yaml.safe_load((out / "fuse_oof.yaml").read_text())
    assert saved["iou_thr"] == 0.6 and saved["split"] == "oof"


def test_none_is_wired_from_both_sources(prepared, tmp_path):
    """A classifier file without `none`: none_cls = its P(negative) (none_source=auto); one detector
    with every true box at conf 0.9: none_det = 0.1^(boxes); none = their linear blend at w=0.5."""
    images = truth_images(prepared, "oof")
    exact_detections(images).to_csv(tmp_path / "det.csv", index=False)
    cls = classifier(images, seed=2, signal=1.0).drop(columns=["none"])
    cls.to_csv(tmp_path / "cls.csv", index=False)
    args = [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "none_cls_weight=0.5"]
    out = run(args, tmp_path)["dir"]
    got = pd.read_csv(out / "images_oof.csv", dtype={"image_id": str}).set_index("image_id")
    n_boxes = images.set_index("image_id").boxes.map(len)
    negative = cls.set_index("image_id").negative
    assert got.none_cls.to_numpy() == pytest.approx(negative.loc[got.index].to_numpy())
    assert got.none_det.to_numpy() == pytest.approx(0.1 ** n_boxes.loc[got.index].to_numpy())
    assert got.none.to_numpy() == pytest.approx(0.5 * got.none_cls.to_numpy() + 0.5 * got.none_det.to_numpy())


def test_fuse_test_writes_a_submission_that_passes_the_checker(prepared, synth_root, tmp_path):
    """Every fold's model on every test image (WBF across folds), perfect inputs: the submission holds
    every sample id, passes the checker and scores 1 on the hidden test truth; without boxes,
    AP(opacity) = 0 and the final is (k - 1) / k over the k classes present."""
    images = truth_images(prepared, "test")
    exact_detections(images, models=("m1",), folds=[0, 1, 2]).to_csv(tmp_path / "det.csv", index=False)
    per_fold = pd.concat([classifier(images).assign(fold=k) for k in range(3)])  # several rows per image: averaged
    per_fold.to_csv(tmp_path / "cls.csv", index=False)
    result = run([f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=test"], tmp_path)
    path = result["dir"] / "submission.csv"
    sample = synth_root / "sample_submission.csv"
    sub = read_submission(path, sample=sample)  # raises on anything Kaggle would reject
    assert list(sub.id) == sample_ids(sample)
    full = cli.main(["evaluate", f"submission={path}", f"data={synth_root}", "split=test", "ids=all"])
    assert full.final == pytest.approx(1.0)

    only_cls = run([f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", "split=test"], tmp_path, "nobox")
    scored = cli.main(
        ["evaluate", f"submission={only_cls['dir'] / 'submission.csv'}", f"data={synth_root}", "split=test", "ids=all"]
    )
    k = len(scored.ap)
    assert scored.ap["opacity"] == 0.0
    assert scored.final == pytest.approx((k - 1) / k)


def test_tune_never_returns_worse_than_its_start_and_best_yaml_reproduces(prepared, tmp_path):
    images = truth_images(prepared, "oof")
    noisy_detections(images).to_csv(tmp_path / "det.csv", index=False)
    classifier(images, seed=1, signal=1.0).to_csv(tmp_path / "cls.csv", index=False)
    common = [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=oof"]
    start = ["none_cls_weight=0.3", "opacity_exponent=2.0", "iou_thr=0.5"]  # a deliberately odd start
    result = cli.main(
        ["fuse", "tune", *common, *start, "trials=6", "seed=3", f"project={tmp_path / 'runs'}", "name=t", "workers=1"]
    )
    assert result["best_score"] >= result["default_score"]
    trials = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv")
    assert trials.final.max() == pytest.approx(result["best_score"])
    assert trials.loc[0, "phase"] == "default" and trials.loc[0, "final"] == pytest.approx(result["default_score"])
    start_score = run([*common, *start], tmp_path, "start")["score"].final
    assert start_score == pytest.approx(result["default_score"])  # trial 0 is the config it started from
    best = run([*common, f"cfg={tmp_path / 'runs' / 't' / 'best.yaml'}"], tmp_path, "best")["score"].final
    assert best == pytest.approx(result["best_score"])
    again = cli.main(
        ["fuse", "tune", *common, *start, "trials=6", "seed=3", f"project={tmp_path / 'runs'}", "name=t2", "workers=1"]
    )
    pd.testing.assert_frame_equal(again["trials"], result["trials"])  # seeded: the same search


def test_tune_keeps_the_start_when_nothing_beats_it(prepared, tmp_path):
    """Perfect inputs score 1 with the defaults: no trial may replace them (ties keep trial 0, and
    simplification puts back any parameter that does not change the score)."""
    images = truth_images(prepared, "oof")
    exact_detections(images).to_csv(tmp_path / "det.csv", index=False)
    classifier(images).to_csv(tmp_path / "cls.csv", index=False)
    result = cli.main(
        [
            "fuse",
            "tune",
            f"data={prepared}",
            f"det={tmp_path / 'det.csv'}",
            f"cls={tmp_path / 'cls.csv'}",
            "trials=3",
            f"project={tmp_path / 'runs'}",
            "name=t",
            "workers=1",
        ]
    )
    assert result["default_score"] == pytest.approx(1.0)
    defaults = cli.resolve(["fuse"])[1]
    assert result["best"] == {k: defaults[k] for k in FUSION_KEYS}


# ----------------------------------------------------------------------------- input errors
def test_readers_reject_bad_inputs_with_file_and_line(prepared, tmp_path):
    images = truth_images(prepared, "oof")
    det = exact_detections(images)
    good_cls = tmp_path / "cls.csv"
    classifier(images).to_csv(good_cls, index=False)
    base = [f"data={prepared}", f"cls={good_cls}", "split=oof"]

    det.drop(columns=["conf"]).to_csv(tmp_path / "noconf.csv", index=False)
    with pytest.raises(DataError, match=r"noconf.csv: missing column\(s\) \['conf'\]"):
        run([*base, f"det={tmp_path / 'noconf.csv'}"], tmp_path)
    wrong = det.copy()
    wrong.loc[3, "fold"] = (wrong.loc[3, "fold"] + 1) % 3
    wrong.to_csv(tmp_path / "wrongfold.csv", index=False)
    with pytest.raises(DataError, match=r"wrongfold.csv, line 5: .*not out-of-fold"):
        run([*base, f"det={tmp_path / 'wrongfold.csv'}"], tmp_path)
    bad = det.astype({"conf": object})
    bad.loc[1, "conf"] = "high"
    bad.to_csv(tmp_path / "badconf.csv", index=False)
    with pytest.raises(DataError, match=r"badconf.csv, line 3: column conf"):
        run([*base, f"det={tmp_path / 'badconf.csv'}"], tmp_path)
    far = det.copy()
    far.loc[2, ["x_min", "x_max"]] = [images.cols.max() + 10, images.cols.max() + 20]
    far.to_csv(tmp_path / "far.csv", index=False)
    with pytest.raises(DataError, match=r"far.csv, line 4: box .* lies outside image .*original DICOM pixels"):
        run([*base, f"det={tmp_path / 'far.csv'}"], tmp_path)
    text = (tmp_path / "badconf.csv").read_text().splitlines()
    (tmp_path / "blank.csv").write_text("\n".join([text[0], "", *text[1:]]) + "\n")  # a blank line counts
    with pytest.raises(DataError, match=r"blank.csv, line 4: column conf"):
        run([*base, f"det={tmp_path / 'blank.csv'}"], tmp_path)
    det.to_csv(tmp_path / "det.csv", index=False)
    with pytest.raises(DataError, match="not a test image"):
        run([f"data={prepared}", f"det={tmp_path / 'det.csv'}", "split=test"], tmp_path)
    with pytest.raises(SiimError, match="det_weights has 2 value"):
        run([*base, f"det={tmp_path / 'det.csv'}", "det_weights=2,1"], tmp_path)
    with pytest.raises(SiimError, match="conf_type"):
        run([*base, f"det={tmp_path / 'det.csv'}", "conf_type=mean"], tmp_path)
    with pytest.raises(SiimError, match="none_blend='mean'"):
        run([*base, f"det={tmp_path / 'det.csv'}", "none_blend=mean"], tmp_path)
    classifier(images).drop(columns=["atypical"]).to_csv(tmp_path / "cls3.csv", index=False)
    with pytest.raises(DataError, match=r"cls3.csv: missing column\(s\) \['atypical'\]"):
        run([f"data={prepared}", f"cls={tmp_path / 'cls3.csv'}"], tmp_path)
    with pytest.raises(SiimError, match="split=oof"):
        cli.main(["fuse", "tune", *base, "split=test", f"project={tmp_path}"])


def test_classifier_files_are_checked_against_the_prepared_data_with_file_and_line(prepared, tmp_path):
    images = truth_images(prepared, "oof")
    cls = classifier(images).assign(fold=images.fold.to_numpy())
    base = [f"data={prepared}", "split=oof"]

    wrong = cls.copy()
    wrong.loc[4, "fold"] = (wrong.loc[4, "fold"] + 1) % 3
    wrong.to_csv(tmp_path / "wrongfold.csv", index=False)
    with pytest.raises(DataError, match=r"wrongfold.csv, line 6: predicted by another fold's model"):
        run([*base, f"cls={tmp_path / 'wrongfold.csv'}"], tmp_path)
    two = pd.concat([cls, cls.iloc[[2]].assign(study_id="another")], ignore_index=True)
    two.to_csv(tmp_path / "two.csv", index=False)
    with pytest.raises(DataError, match=rf"two.csv, line {len(two) + 1}: image {cls.image_id[2]} has two study_ids"):
        run([*base, f"cls={tmp_path / 'two.csv'}"], tmp_path)
    moved = cls.assign(study_id=np.roll(cls.study_id.to_numpy(), 1))
    moved.to_csv(tmp_path / "moved.csv", index=False)
    with pytest.raises(DataError, match=r"moved.csv: image .*: study_id .* but the prepared data says"):
        run([*base, f"cls={tmp_path / 'moved.csv'}"], tmp_path)
    high = cls.copy()
    high.loc[1, "typical"] = 1.5
    high.to_csv(tmp_path / "high.csv", index=False)
    with pytest.raises(DataError, match=r"high.csv, line 3: typical must be in \[0, 1\]"):
        run([*base, f"cls={tmp_path / 'high.csv'}"], tmp_path)
    with pytest.raises(DataError, match=r"cls.csv: image .* is not a test image"):
        cls.to_csv(tmp_path / "cls.csv", index=False)
        run([f"data={prepared}", f"cls={tmp_path / 'cls.csv'}", "split=test"], tmp_path)


def test_a_skipped_test_image_is_named_at_prepare_and_at_fuse(tiny_root, tmp_path, caplog):
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
    from siimcovid.data.prepared import Prepared
    from siimcovid.data.siim import find_dicoms

    bad = find_dicoms(tiny_root / "test").iloc[0]
    with open(bad.path, "wb") as f:
        f.write(b"not a dicom")
    settings = {"data": str(tiny_root), "out": str(tmp_path / "prep"), "sizes": [32], "n_folds": 2, "workers": 1}
    prepare(load_config("prepare", {**settings, "on_error": "skip", "data_yaml_dir": str(tmp_path / "yaml")}))
    assert "1 TEST image(s) skipped" in caplog.text
    test = Prepared(tmp_path / "prep").split("test")
    pd.DataFrame({"image_id": test.image_id, "study_id": test.study_id, **{c: 0.25 for c in STUDY_CLASSES}}).to_csv(
        tmp_path / "cls.csv", index=False
    )
    with pytest.raises(SiimError, match=rf"{bad.image_id}: prepare skipped unreadable images \(see .*skipped.csv\)"):
        run([f"data={tmp_path / 'prep'}", f"cls={tmp_path / 'cls.csv'}", "split=test"], tmp_path)


def test_normalised_boxes_are_flagged(prepared, tmp_path, caplog):
    images = truth_images(prepared, "oof")
    det = exact_detections(images).merge(images[["image_id", "cols", "rows"]], on="image_id")
    for c, side in (("x_min", "cols"), ("x_max", "cols"), ("y_min", "rows"), ("y_max", "rows")):
        det[c] = det[c] / det[side]  # YOLO-style 0..1 coordinates instead of original pixels
    det[DET].to_csv(tmp_path / "norm.csv", index=False)
    run([f"data={prepared}", f"det={tmp_path / 'norm.csv'}", "split=oof"], tmp_path)
    assert "lies within [0, 1]: normalised coordinates?" in caplog.text


def test_test_none_det_is_on_the_out_of_fold_scale(prepared, tmp_path):
    """On test, a detection found by one fold model of three keeps a third of its WBF confidence;
    none_det is computed fold by fold (as out of fold, where each image has one fold model) and
    averaged, so the none formulas fuse tune fitted out of fold mean the same on test."""
    images = truth_images(prepared, "test")
    first = images.iloc[0]
    w, h = first.cols / 10, first.rows / 10
    two_boxes = [(first.image_id, "m1", 0, w, h, 2 * w, 2 * h, 0.8), (first.image_id, "m1", 0, 5 * w, 5 * h, 6 * w, 6 * h, 0.8)]
    others = exact_detections(images.iloc[1:], models=("m1",), folds=[0, 1, 2])
    pd.concat([pd.DataFrame(two_boxes, columns=DET), others]).to_csv(tmp_path / "det.csv", index=False)
    classifier(images).to_csv(tmp_path / "cls.csv", index=False)
    args = [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=test", "none_det=prod"]
    result = run(args, tmp_path)
    table = pd.read_csv(result["dir"] / "images_test.csv").set_index("image_id")
    # fold 0: two boxes at 0.8 -> 0.2 * 0.2; folds 1 and 2 found nothing -> 1; mean over the folds
    assert table.loc[first.image_id, "none_det"] == pytest.approx((0.04 + 1 + 1) / 3)
    fused = pd.read_csv(result["dir"] / "boxes_test.csv")
    assert fused[fused.image_id == first.image_id].wbf_conf.to_numpy() == pytest.approx([0.8 / 3, 0.8 / 3])


# ----------------------------------------------------------------------------- several members, end to end
def shifted(images, model, conf, dx=0.0, tta=None):
    """The true boxes of the images with boxes, moved right by dx of their width, at one confidence."""
    rows = []
    for rec in images.itertuples():
        for x1, y1, x2, y2 in rec.boxes:
            w = x2 - x1
            rows.append((rec.image_id, model, rec.fold, x1 + dx * w, y1, x2 + dx * w, y2, conf))
    out = pd.DataFrame(rows, columns=DET)
    return out if tta is None else out.assign(tta=tta)


def fused_boxes(result) -> pd.DataFrame:
    return pd.read_csv(result["dir"] / "boxes_oof.csv", dtype={"image_id": str})


def test_det_weights_per_file_and_per_model_pull_the_fused_boxes_toward_the_heavier_file(prepared, tmp_path):
    """File a: the true boxes at conf 0.9; file b: the same boxes moved right by 10% of their width
    at conf 0.3. WBF (conf_type avg) gives conf = weighted mean of the members' confs and box =
    mean of the boxes weighted by conf x weight: weighting a 2:1 moves both toward a."""
    images = truth_images(prepared, "oof")
    with_boxes = images[[len(b) > 0 for b in images.boxes]]
    shifted(with_boxes, "ma", 0.9).to_csv(tmp_path / "a.csv", index=False)
    shifted(with_boxes, "mb", 0.3, dx=0.1).to_csv(tmp_path / "b.csv", index=False)
    args = [f"data={prepared}", f"det={tmp_path / 'a.csv'},{tmp_path / 'b.csv'}"]
    equal = fused_boxes(run(args, tmp_path, "equal"))
    heavy_a = fused_boxes(run([*args, "det_weights=2,1"], tmp_path, "heavy_a"))
    heavy_b = fused_boxes(run([*args, "det_weights=1,2"], tmp_path, "heavy_b"))

    n = sum(len(b) for b in with_boxes.boxes)
    assert len(equal) == len(heavy_a) == len(heavy_b) == n  # each true box and its shifted copy make one cluster
    assert equal.wbf_conf.to_numpy() == pytest.approx(np.full(n, (0.9 + 0.3) / 2))
    assert heavy_a.wbf_conf.to_numpy() == pytest.approx(np.full(n, (2 * 0.9 + 0.3) / 3))
    assert heavy_b.wbf_conf.to_numpy() == pytest.approx(np.full(n, (0.9 + 2 * 0.3) / 3))
    key = ["image_id", "y_min", "y_max"]  # the shift moves x only: y pairs each fused box with its true box
    true = shifted(with_boxes, "t", 1.0).sort_values(key).reset_index(drop=True)
    width = (true.x_max - true.x_min).to_numpy()
    offset = {}  # fused x_min - true x_min, in units of box width: a's share is 0, b's 0.1
    for name, table in (("equal", equal), ("heavy_a", heavy_a), ("heavy_b", heavy_b)):
        table = table.sort_values(key).reset_index(drop=True)
        assert table.y_min.to_numpy() == pytest.approx(true.y_min.to_numpy(), abs=0.01)
        offset[name] = (table.x_min.to_numpy() - true.x_min.to_numpy()) / width
    assert offset["equal"] == pytest.approx(np.full(n, 0.1 * 0.3 / (0.9 + 0.3)), abs=1e-3)
    assert offset["heavy_a"] == pytest.approx(np.full(n, 0.1 * 0.3 / (2 * 0.9 + 0.3)), abs=1e-3)
    assert offset["heavy_b"] == pytest.approx(np.full(n, 0.1 * 0.6 / (0.9 + 0.6)), abs=1e-3)

    # the same weights per model, from a cfg file: {ma: 2} (mb, not named, keeps 1)
    (tmp_path / "weights.yaml").write_text("det_weights: {ma: 2}\n")
    per_model = fused_boxes(run([*args, f"cfg={tmp_path / 'weights.yaml'}"], tmp_path, "per_model"))
    pd.testing.assert_frame_equal(per_model, fused_boxes(run([*args, "det_weights=2,1"], tmp_path, "per_file")))
    (tmp_path / "unknown.yaml").write_text("det_weights: {yolo: 2}\n")
    with pytest.raises(SiimError, match=r"det_weights names model\(s\) \['yolo'\]"):
        run([*args, f"cfg={tmp_path / 'unknown.yaml'}"], tmp_path, "unknown")


def expected_studies(images, per_image: np.ndarray) -> pd.DataFrame:
    """Study probabilities = the mean of their images' rows (per_image aligned with images)."""
    frame = pd.DataFrame(per_image, columns=STUDY_CLASSES).assign(study_id=images.study_id.to_numpy())
    return frame.groupby("study_id", sort=False)[STUDY_CLASSES].mean()


def test_cls_ensemble_and_cls_weights_over_two_classifier_files(prepared, tmp_path):
    """Two classifier files through the stage: mean with cls_weights=3,1 is the weighted mean per
    image; geometric lies at or below it (AM-GM), strictly where the files disagree; rank mixes
    each file's percentile ranks over the fused images."""
    images = truth_images(prepared, "oof")
    a, b = classifier(images, seed=11, signal=1.5), classifier(images, seed=12, signal=0.5)
    a.to_csv(tmp_path / "a.csv", index=False)
    b.to_csv(tmp_path / "b.csv", index=False)
    args = [f"data={prepared}", f"cls={tmp_path / 'a.csv'},{tmp_path / 'b.csv'}"]

    def studies(name, *extra):
        result = run([*args, *extra], tmp_path, name)
        return pd.read_csv(result["dir"] / "studies_oof.csv", dtype={"study_id": str}).set_index("study_id")

    pa, pb = a[STUDY_CLASSES].to_numpy(), b[STUDY_CLASSES].to_numpy()
    mean = studies("mean", "cls_ensemble=mean", "cls_weights=3,1")
    want = expected_studies(images, (3 * pa + pb) / 4)
    np.testing.assert_allclose(mean.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-12)
    plain = studies("plain", "cls_ensemble=mean")
    assert not np.allclose(plain.to_numpy(), mean.loc[plain.index].to_numpy())  # the weights matter

    geo = studies("geometric", "cls_ensemble=geometric")
    want = expected_studies(images, np.sqrt(np.clip(pa, 1e-7, 1) * np.clip(pb, 1e-7, 1)))
    np.testing.assert_allclose(geo.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-9)
    assert (geo.to_numpy() <= plain.loc[geo.index].to_numpy() + 1e-12).all()
    assert (geo.to_numpy() < plain.loc[geo.index].to_numpy() - 1e-3).any()

    rank = studies("rank", "cls_ensemble=rank", "cls_weights=1,3")
    pct = lambda p: pd.DataFrame(p).rank(pct=True).to_numpy()  # noqa: E731
    want = expected_studies(images, (pct(pa) + 3 * pct(pb)) / 4)
    np.testing.assert_allclose(rank.loc[want.index].to_numpy(), want.to_numpy(), rtol=1e-12)

    with pytest.raises(SiimError, match="cls_ensemble='median': expected one of mean, geometric, geomean, rank"):
        run([*args, "cls_ensemble=median"], tmp_path, "bad")
    with pytest.raises(SiimError, match="cls_weights"):
        run([*args, "cls_weights=1,2,3"], tmp_path, "bad")


def test_a_tta_column_makes_each_variant_its_own_member(prepared, tmp_path):
    """The true boxes at 0.8 as variant `orig` everywhere and as `hflip` on half the images: with the
    tta column the file holds two box sets (test: two per fold), and a box only `orig` found keeps
    half its confidence (conf_type avg); without the column the rows are one set, every conf 0.8."""
    from siimcovid.fuse.inputs import load_inputs

    images = truth_images(prepared, "oof")
    with_boxes = images[[len(b) > 0 for b in images.boxes]]
    half = with_boxes.iloc[::2]
    tta = pd.concat([shifted(with_boxes, "m1", 0.8, tta="orig"), shifted(half, "m1", 0.8, tta="hflip")])
    tta.to_csv(tmp_path / "tta.csv", index=False)
    tta.drop(columns=["tta"]).to_csv(tmp_path / "plain.csv", index=False)

    def n_sets(path, split="oof"):
        return load_inputs(load_config("fuse", {"data": str(prepared), "det": [str(path)], "split": split})).n_sets

    assert n_sets(tmp_path / "plain.csv") == 1
    assert n_sets(tmp_path / "tta.csv") == 2
    test = truth_images(prepared, "test")
    test_tta = pd.concat(
        [shifted(test.assign(fold=k), "m1", 0.8, tta=t) for k in range(3) for t in ("orig", "hflip")], ignore_index=True
    )
    test_tta.to_csv(tmp_path / "test_tta.csv", index=False)
    test_tta.drop(columns=["tta"]).to_csv(tmp_path / "test_plain.csv", index=False)
    assert n_sets(tmp_path / "test_plain.csv", "test") == 3
    assert n_sets(tmp_path / "test_tta.csv", "test") == 6

    by_tta = fused_boxes(run([f"data={prepared}", f"det={tmp_path / 'tta.csv'}"], tmp_path, "tta"))
    plain = fused_boxes(run([f"data={prepared}", f"det={tmp_path / 'plain.csv'}"], tmp_path, "plain"))
    assert len(by_tta) == len(plain) == sum(len(b) for b in with_boxes.boxes)
    both = by_tta.image_id.isin(set(half.image_id))
    assert by_tta.wbf_conf[both].to_numpy() == pytest.approx(np.full(both.sum(), 0.8))
    assert by_tta.wbf_conf[~both].to_numpy() == pytest.approx(np.full((~both).sum(), 0.4))
    assert plain.wbf_conf.to_numpy() == pytest.approx(np.full(len(plain), 0.8))


def test_tune_searches_member_weights_over_several_files(prepared, tmp_path):
    """Two det files (the true boxes; pure noise) and two cls files (good; pure noise): trials try
    unequal member weights, the search gives the noise files the smallest weight of the space, and
    the best.yaml it writes (the parameters it returns) reproduces its score as cfg=."""
    images = truth_images(prepared, "oof")
    rng = np.random.default_rng(5)
    good = noisy_detections(images, models=("good",), seed=6)
    noise = good.assign(model="noise", conf=rng.uniform(0.05, 0.95, len(good)))
    noise[["x_min", "x_max"]] = noise[["x_min", "x_max"]].to_numpy()[rng.permutation(len(noise))]
    noise[["x_min", "x_max"]] = np.sort(noise[["x_min", "x_max"]].to_numpy(), axis=1)
    good.to_csv(tmp_path / "det_good.csv", index=False)
    noise.to_csv(tmp_path / "det_noise.csv", index=False)
    classifier(images, seed=7, signal=2.0).to_csv(tmp_path / "cls_good.csv", index=False)
    classifier(images, seed=8, signal=0.0).to_csv(tmp_path / "cls_noise.csv", index=False)
    (tmp_path / "space.yaml").write_text("space:\n  det_weights: [0.25, 4.0]\n  cls_weights: [0.25, 4.0]\n")
    common = [
        f"data={prepared}",
        f"det={tmp_path / 'det_good.csv'},{tmp_path / 'det_noise.csv'}",
        f"cls={tmp_path / 'cls_good.csv'},{tmp_path / 'cls_noise.csv'}",
    ]
    result = cli.main(
        ["fuse", "tune", *common, f"cfg={tmp_path / 'space.yaml'}", "trials=4", "seed=1"]
        + [f"project={tmp_path / 'runs'}", "name=t", "workers=1"]
    )
    trials = pd.read_csv(tmp_path / "runs" / "t" / "trials.csv", dtype={"det_weights": str, "cls_weights": str}).fillna("")
    returned = result["trials"]  # the table it returns is the one it wrote
    assert trials[["trial", "phase", "det_weights", "cls_weights"]].equals(
        returned[["trial", "phase", "det_weights", "cls_weights"]]
    )
    assert trials.final.to_numpy() == pytest.approx(returned.final.to_numpy(), rel=1e-5)

    def unequal(column):
        return {tuple(float(v) for v in w.split(",")) for w in trials[column] if w and len({*w.split(",")}) > 1}

    assert unequal("det_weights") >= {(1.0, 0.25), (1.0, 4.0)}
    assert unequal("cls_weights") >= {(1.0, 0.25), (1.0, 4.0)}
    assert result["best"]["det_weights"] == [1.0, 0.25]
    assert result["best"]["cls_weights"] == [1.0, 0.25]
    assert result["best_score"] > result["default_score"]

    best_file = tmp_path / "runs" / "t" / "best.yaml"
    assert result["best_file"] == best_file
    assert yaml.safe_load(best_file.read_text()) == result["best"]
    again = run([*common, f"cfg={best_file}"], tmp_path, "best")["score"].final
    assert again == pytest.approx(result["best_score"])

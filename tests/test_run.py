"""`siimcovid run` end to end on a very small synthetic set, `siimcovid runs`, and the report plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_run_call

from siimcovid import metrics, report
from siimcovid.cli import call
from siimcovid.runs import list_runs
from siimcovid.submission import check_submission, read_submission


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole pipeline with every knob at its smallest (conftest.TINY_RUN), with the report and nested tuning:
    its own run, since test_rerun_resumes_without_training_again runs it again under other settings."""
    base = tmp_path_factory.mktemp("run")
    classify_predict = {"tta": False, "workers": 0}
    result = tiny_run_call(base, detect_predict={"tta": False, "batch": 8}, classify_predict=classify_predict,
                           nested_tuning=True, report=True)  # fmt: skip
    return base, result


@pytest.mark.slow
def test_run_writes_a_valid_submission_and_the_cv_table(demo):
    base, result = demo
    sample = base / "siim" / "sample_submission.csv"
    sub = read_submission(result["submission"], sample=sample)  # raises if Kaggle would reject it
    check_submission(sub, sample=sample)
    ids = set(pd.read_csv(sample).id)
    assert set(sub.id) == ids
    table = pd.read_csv(base / "runs" / "run" / "e2e" / "cv_table.csv")
    assert table.method[0].startswith("fused, tuned on the other folds (nested")
    assert table.method[1].startswith("fused, tuned on all OOF") and table.method[2] == "fused, default fusion settings"
    assert table.method.str.startswith("baseline").sum() == 3
    assert table.final.notna().all() and ((table.final >= 0) & (table.final <= 1)).all()
    assert table.final[1] >= table.final[2]  # tuning never returns worse than the defaults on the data it tuned on
    nested = base / "runs" / "fuse" / "e2e-nested"
    assert (nested / "fold0" / "best.yaml").exists() and (nested / "fold1" / "scores_oof.csv").exists()
    priors = table[table.method.str.contains("priors")].iloc[0]
    assert priors.opacity == 0  # no boxes, no opacity AP
    assert result["demo"].startswith("not the demo's settings (")  # tiny models: the demo's range does not apply


@pytest.mark.slow
def test_run_report_and_outputs(demo):
    base, result = demo
    out = base / "runs" / "run" / "e2e"
    for name in ("report.md", "pr_curves.png", "confusion.png", "samples.png", "run.yaml"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "baseline: detector alone" in text and "![PR curves](pr_curves.png)" in text
    assert "Not the demo's settings (" in text  # the log's last word on the range, beside the table
    assert (base / "runs" / "detect" / "e2e" / "pred_oof.csv").exists()
    assert (base / "runs" / "classify" / "e2e" / "pred_test_image.csv").exists()


@pytest.mark.slow
def test_runs_lists_every_stage(demo, capsys):
    base, _ = demo
    table = list_runs(base / "runs")
    by_stage = dict(zip(table.stage + "/" + table.name, table.cv))
    assert {"prepare/e2e", "detect/e2e", "classify/e2e", "fuse/e2e", "run/e2e"} <= set(by_stage)
    assert "final" in by_stage["run/e2e"] and "submission.csv" in by_stage["fuse/e2e"]
    call("runs", project=str(base / "runs"), stage="detect")
    printed = capsys.readouterr().out
    assert "e2e" in printed and "classify" not in printed


@pytest.mark.slow
def test_runs_shows_the_cv_every_stage_saved(demo):
    base, _ = demo
    table = list_runs(base / "runs")
    by_stage = dict(zip(table.stage + "/" + table.name, table.cv))
    assert by_stage["detect/e2e"].startswith("opacity AP") and by_stage["classify/e2e"].startswith("study mAP")
    assert by_stage["fuse/e2e"].startswith("final ")


@pytest.mark.slow
def test_rerun_resumes_without_training_again(demo, monkeypatch):
    base, result = demo
    from siimcovid.classify import train as cls_train
    from siimcovid.detect import train as det_train

    calls = []
    monkeypatch.setattr(det_train, "YOLO", lambda *a, **k: calls.append("detect"))  # only built to train a fold
    monkeypatch.setattr(cls_train.FoldTrainer, "run", lambda self: calls.append("classify"))
    cfg = base / "runs" / "run" / "e2e" / "run.yaml"
    again = call("run", cfg=str(cfg), tune_trials=0, report=False)
    assert calls == []  # every fold was finished: skipped
    assert again["table"].final[0] == pytest.approx(result["table"].final[2], abs=1e-9)  # default settings again


def test_pr_curve_area_is_the_metric_ap():
    rng = np.random.default_rng(0)
    truth = pd.DataFrame({"id": [f"i{k}_image" for k in range(30)], "cls": "opacity"})
    truth[["x_min", "y_min"]] = rng.uniform(0, 50, (30, 2))
    truth[["x_max", "y_max"]] = truth[["x_min", "y_min"]].to_numpy() + 20
    pred = truth.sample(frac=1.0, random_state=1).copy()
    pred[["x_min", "x_max"]] += rng.normal(0, 6, (30, 1))
    pred["conf"] = rng.uniform(size=30)
    pred = pred[metrics.PRED_COLUMNS]
    recall, precision, ap = report.pr_curve(truth, pred, "opacity")
    assert ap == pytest.approx(metrics.average_precision(truth, pred, "opacity"))
    assert recall[-1] <= 1 and np.all(np.diff(recall) >= 0)


def test_confusion_matrix_counts():
    probs = pd.DataFrame(
        {
            "negative": [0.9, 0.1, 0.2],
            "typical": [0.05, 0.8, 0.7],
            "indeterminate": [0.03, 0.05, 0.05],
            "atypical": [0.02, 0.05, 0.05],
        }
    )
    table = report.confusion_matrix(np.array(["negative", "typical", "atypical"]), probs)
    assert table.loc["negative", "negative"] == 1 and table.loc["typical", "typical"] == 1
    assert table.loc["atypical", "typical"] == 1 and table.to_numpy().sum() == 3


def test_run_owns_the_names_and_paths_of_its_stages():
    from siimcovid.run import section_settings
    from siimcovid.utils import SiimError

    assert section_settings({"epochs": 3}, "detect", name="x") == {"epochs": 3, "name": "x"}
    with pytest.raises(SiimError, match=r"run sets \['name'\] of `detect` itself"):
        section_settings({"name": "v5x"}, "detect", name="x")


def test_predict_inherits_the_runtime_settings_of_the_train_section():
    from siimcovid.run import predict_settings

    cfg = {"detect": {"device": "cpu", "workers": 0, "plots": False, "epochs": 3, "batch": 8}, "detect_predict": {"workers": 2}}
    assert predict_settings(cfg, "detect") == {"device": "cpu", "workers": 2, "plots": False}  # predict's own win
    cfg = {"classify": {"device": "cpu", "amp": False, "epochs": 1}, "classify_predict": {}}
    assert predict_settings(cfg, "classify") == {"device": "cpu", "amp": False}


def test_run_gives_each_detector_its_views_and_it_predicts_with_the_margin_it_trained_with(tmp_path):
    from siimcovid.config import load_config
    from siimcovid.run import SECOND, crop_views, detect_configs

    sections = {"detect": {"crop_margin": 0.2, "lung_conf": 0.4}, "detect2": {"family": "torchvision", "crop_margin": 0.1}}
    cfg = load_config("run", {"name": "x", "data": str(tmp_path / "siim"), "crop": "lung", **sections})
    lung = tmp_path / "runs" / "detect" / "x-lung"
    views = crop_views(cfg, lung)
    train, predict = detect_configs(cfg, tmp_path / "prep", tmp_path / "runs", views=views)
    assert (train.crop, train.lung, train.crop_margin, train.lung_conf) == ("lung", str(lung), 0.2, 0.4)
    assert (predict.crop, predict.lung, predict.crop_margin, predict.lung_conf) == ("lung", str(lung), 0.2, 0.4)
    train, predict = detect_configs(cfg, tmp_path / "prep", tmp_path / "runs", "x-torchvision", SECOND, views)
    assert (train.crop_margin, predict.crop_margin, predict.lung_conf) == (0.1, 0.1, 0.25)  # its own section's, else the default
    train, predict = detect_configs(cfg, tmp_path / "prep", tmp_path / "runs")  # no views: whole images
    assert train.crop == predict.crop == "none" and predict.crop_margin == 0.05


@pytest.mark.parametrize(
    "section, message",
    [
        ({"classify": {"epochs": "three"}}, "classify setting epochs='three'"),
        ({"detect": {"lr0": float("inf")}}, "detect setting lr0=inf"),
        ({"fuse": {"iou_thr": 2.0}}, "fuse setting iou_thr=2.0"),
        ({"pseudo": {"rounds": 1, "box_conf": "high"}}, "pseudo setting box_conf='high'"),
        ({"pseudo": {"rounds": "one"}}, r"^run section pseudo: rounds='one': expected int >= 0$"),
        (
            {"classify_predict": {"tta": True, "epcohs": 3}},
            r"unknown classify setting 'epcohs' \(did you mean 'epochs'\?\) in run section classify_predict\.",
        ),
        ({"demo_range": [0.7, 0.5]}, r"demo_range=\[0.7, 0.5\]: expected \[low, high\] with low <= high"),
        (
            {"detect": {"gpu_per_trial": 1}},
            r"^detect setting 'gpu_per_trial' in run section detect is now called 'gpus_per_trial'$",
        ),
    ],
)
def test_a_bad_value_in_any_section_stops_run_before_anything_is_written(tmp_path, section, message):
    """A typo in the classify section must not wait for hours of detector training to be found."""
    from siimcovid.utils import SiimError

    with pytest.raises(SiimError, match=message):
        call("run", name="x", data=str(tmp_path / "siim"), project=str(tmp_path / "runs"), **section)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "siim").exists()


def test_the_demo_at_other_seeds_is_compared_with_its_range_and_a_changed_run_is_not():
    """A newcomer's demo that prints another table than the README's is told whether that is noise seen before."""
    from siimcovid import run, stages

    def config(**settings):
        return stages.stage_config("run", None, settings)

    lo, hi = config().demo_range
    seeds = config(**{"detect.seed": 3, "classify.seed": 7, "detect.device": "0", "classify.workers": 4, "name": "seed3"})
    assert run.demo_differences(seeds) == []  # seeds, devices, workers and names leave it the demo
    assert "inside the demo's range" in run.compare_with_demo(seeds, (lo + hi) / 2)
    assert "below the demo's range" in run.compare_with_demo(seeds, lo - 0.05)
    assert "above the demo's range" in run.compare_with_demo(seeds, hi + 0.05)
    changed = config(**{"detect.epochs": 30, "fuse.iou_thr": 0.5, "nested_tuning": False, "data": "elsewhere"})
    assert run.demo_differences(changed) == ["data", "detect.epochs", "fuse.iou_thr", "nested_tuning"]
    assert run.compare_with_demo(changed, (lo + hi) / 2).startswith("not the demo's settings (data, detect.epochs")
    assert run.demo_differences(config(data="./datasets/../datasets/siim-synth")) == []  # the same folder, spelt otherwise
    # a section runs as its stage fills it: a default spelt out, or the unused lung and pseudo sections, are the demo
    same = {"classify.lr": 0.001, "fuse.det_scale": [], "export": False, "lung_detect.epochs": 3, "pseudo.source": "x"}
    assert run.demo_differences(config(**same)) == []
    other = {"synth.seed": 2, "prepare.seed": 1, "fuse.seed": 3, "detect_predict.precision": "bf16", "crop": "lung"}
    other["lung_detect.epochs"] = 3
    assert run.demo_differences(config(**other)) == [
        "synth.seed", "prepare.seed", "detect_predict.precision", "crop", "lung_detect.epochs", "fuse.seed"
    ]  # other data, folds, tuning draws or numerics; crop=lung brings its lung detector's section in
    assert run.compare_with_demo(config(demo_range=None), 0.1) is None

"""Outputs never destroy a user's files, in the stages that train into a run folder, predict to out=, score to out=
or regenerate a dataset (issue 17, item 3; the rule itself: tests/test_outputs.py).

A run folder <project>/<name> is the run's own when its run config (classify.yaml, detect.yaml) is one a training
saved; a fold folder when the stage's trace in it says the stage made it. Anything else holding files is refused in
one line unless overwrite=true, which trains beside the user's files, never over them. Each case plants a user's
file, runs the real command and checks that the file survives; the slow ones train the smallest models.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from test_outputs import one_line_error, siimcovid_cli

from siimcovid.cli import call
from siimcovid.utils import SiimError

CLASSIFY = {"model": "resnet10t", "pretrained": False, "imgsz": 64, "epochs": 1, "fine_lr": [], "batch": 4}
CLASSIFY |= {"workers": 0, "device": "cpu", "fold": 0}
DETECT = {"model": "yolov5n.yaml", "pretrained": False, "epochs": 1, "imgsz": 64, "batch": 8, "workers": 0}
DETECT |= {"device": "cpu", "plots": False, "fold": 0}
THESIS = "four years of work"


def users_run_folder(project: Path, name: str = "mine") -> Path:
    """A folder of the user's where a run would go: notes beside a fold0/ holding their thesis."""
    run = project / name
    (run / "fold0").mkdir(parents=True)
    (run / "fold0" / "thesis.tex").write_text(THESIS)
    (run / "notes.txt").write_text("my notes")
    return run


def files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def classify_train(prepared: Path, project: Path, **settings):
    return call("classify", "train", data=str(prepared), project=str(project), **{**CLASSIFY, **settings})


def detect_train(prepared: Path, project: Path, **settings):
    return call("detect", "train", data=str(prepared), project=str(project), **{**DETECT, **settings})


# ----------------------------------------------------------------------------- train: refused before any work
def test_classify_train_refuses_a_users_folder_resume_false_included(prepared, tmp_path):
    run = users_run_folder(tmp_path)
    before = files_in(run)
    for resume in (True, False):
        with pytest.raises(SiimError, match=r"project/name=.*mine holds files siimcovid did not write .*overwrite=true"):
            classify_train(prepared, tmp_path, name="mine", resume=resume)
    assert files_in(run) == before and (run / "fold0" / "thesis.tex").read_text() == THESIS
    args = [f"data={prepared}", f"project={tmp_path}", "name=mine", "model=resnet10t", "imgsz=64", "device=cpu"]
    line = one_line_error(siimcovid_cli("classify", "train", *args))
    assert "holds files siimcovid did not write" in line and files_in(run) == before


def test_classify_train_with_overwrite_never_writes_over_a_users_file(prepared, tmp_path):
    run = users_run_folder(tmp_path)
    (run / "fold0" / "results.csv").write_text("my own table")
    with pytest.raises(SiimError, match=r"fold0/results.csv is not a file siimcovid classify wrote"):
        classify_train(prepared, tmp_path, name="mine", overwrite=True, resume=False)
    (run / "fold0" / "results.csv").unlink()
    (run / "classify.yaml").write_text("model: my own notes on models\n")  # not a run's settings: never saved over
    for overwrite in (False, True):
        with pytest.raises(SiimError, match=r"mine/classify.yaml is not a run's settings file siimcovid wrote"):
            classify_train(prepared, tmp_path, name="mine", overwrite=overwrite)
    assert (run / "classify.yaml").read_text() == "model: my own notes on models\n"
    assert files_in(run) == ["classify.yaml", "fold0", "fold0/thesis.tex", "notes.txt"]


def test_detect_train_refuses_a_users_folder_and_with_overwrite_a_users_results_csv(prepared, tmp_path):
    run = users_run_folder(tmp_path)
    (run / "fold0" / "results.csv").write_text("my,own,table\n")
    before = files_in(run)
    with pytest.raises(SiimError, match=r"project/name=.*mine holds files siimcovid did not write .*overwrite=true"):
        detect_train(prepared, tmp_path, name="mine")
    with pytest.raises(SiimError, match=r"fold0/results.csv is not a file siimcovid detect wrote"):
        detect_train(prepared, tmp_path, name="mine", overwrite=True)
    assert files_in(run) == before and (run / "fold0" / "results.csv").read_text() == "my,own,table\n"


def test_a_classify_start_stopped_by_a_check_does_not_bind_the_name_to_its_settings(prepared, tmp_path):
    """batch larger than the fold stops before training, after the run's settings were saved: the corrected command
    is judged by its own settings, not refused as 'was trained with batch=64' (nothing was)."""
    for batch in (64, 48):  # the prepared folds hold ~33 training images: both stop at the same check
        with pytest.raises(SiimError, match=rf"training images, fewer than batch={batch}"):
            classify_train(prepared, tmp_path, name="x", batch=batch)
    assert not list((tmp_path / "x").glob("fold*/last.pt"))


# ----------------------------------------------------------------------------- train: beside the user's files
@pytest.mark.slow
def test_classify_train_overwrite_trains_beside_a_users_files_and_resume_false_keeps_them(prepared, tmp_path):
    run = users_run_folder(tmp_path)
    with pytest.raises(SiimError, match="fewer than batch=64"):  # a first start a check stops (it saves the settings)
        classify_train(prepared, tmp_path, name="mine", overwrite=True, batch=64)
    classify_train(prepared, tmp_path, name="mine", overwrite=True)  # corrected: not refused as 'trained with batch=64'
    fold = run / "fold0"
    assert (fold / "done.json").is_file() and (fold / "thesis.tex").read_text() == THESIS
    first = (fold / "best.pt").stat().st_mtime_ns
    (fold / "draft.tex").write_text("a draft written after the training")
    classify_train(prepared, tmp_path, name="mine", resume=False)  # its own folder now: no overwrite needed
    assert (fold / "best.pt").stat().st_mtime_ns != first and (fold / "done.json").is_file()  # trained again
    assert (fold / "thesis.tex").read_text() == THESIS and (fold / "draft.tex").is_file()
    assert (run / "notes.txt").read_text() == "my notes"


@pytest.mark.slow
def test_detect_train_overwrite_trains_beside_a_users_files(prepared, tmp_path):
    run = users_run_folder(tmp_path)
    detect_train(prepared, tmp_path, name="mine", overwrite=True)
    fold = run / "fold0"
    assert (fold / "weights" / "best.pt").is_file() and (fold / "thesis.tex").read_text() == THESIS
    detect_train(prepared, tmp_path, name="mine")  # its own run now: the finished fold is skipped, nothing refused
    assert (fold / "thesis.tex").read_text() == THESIS and (run / "notes.txt").read_text() == "my notes"


# ----------------------------------------------------------------------------- predict out=
def test_detect_and_classify_predict_refuse_a_users_out_before_loading_any_run(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pred_oof.csv").write_text("my boxes")
    (mine / "pred_oof_image.csv").write_text("my probabilities")
    runs = []
    for name in ("a", "b"):  # run folders: refused before their (absent) weights are read
        (tmp_path / name).mkdir()
        (tmp_path / name / "classify.yaml").write_text("mode: train\n")
        runs.append(str(tmp_path / name))
    with pytest.raises(SiimError, match=r"out=.*mine holds files siimcovid did not write .*overwrite=true"):
        call("detect", "predict", run=runs[:1], out=str(mine), device="cpu")
    with pytest.raises(SiimError, match=r"mine/pred_oof.csv is not a file siimcovid detect wrote"):
        call("detect", "predict", run=runs[:1], out=str(mine), device="cpu", overwrite=True)
    with pytest.raises(SiimError, match=r"out=.*mine holds files siimcovid did not write .*overwrite=true"):
        call("classify", "predict", run=runs, out=str(mine), device="cpu")
    with pytest.raises(SiimError, match=r"mine/pred_oof_image.csv is not a file siimcovid classify wrote"):
        call("classify", "predict", run=runs, out=str(mine), device="cpu", overwrite=True)
    with pytest.raises(SiimError, match="holds the input"):  # an out holding a run would write over its tables
        call("classify", "predict", run=runs, out=str(tmp_path), device="cpu", overwrite=True)
    assert files_in(mine) == ["pred_oof.csv", "pred_oof_image.csv"]
    assert (mine / "pred_oof.csv").read_text() == "my boxes"


@pytest.mark.slow
def test_predict_out_writes_beside_a_users_notes_and_takes_up_an_earlier_ensemble_folder(tiny_run, tmp_path):
    base, _ = tiny_run
    runs = base / "runs"
    det = shutil.copytree(runs / "detect" / "e2e", tmp_path / "det")  # detect predict also writes into its run
    cls, other = runs / "classify" / "e2e", shutil.copytree(runs / "classify" / "e2e", tmp_path / "cls_b")
    boxes = {"run": [str(det)], "device": "cpu", "tta": False, "split": ["oof"]}
    ensemble = {"run": [str(cls), str(other)], "device": "cpu", "workers": 0, "split": ["oof"], "reuse": True}
    users = tmp_path / "users"
    users.mkdir()
    (users / "pred_oof.csv").write_text("my boxes")
    (users / "pred_oof_image.csv").write_text("my probabilities")
    for stage, settings in (("detect", boxes), ("classify", ensemble)):  # trained runs: the commands of the trial
        with pytest.raises(SiimError, match="holds files siimcovid did not write"):
            call(stage, "predict", out=str(users), **settings)
    assert (users / "pred_oof.csv").read_text() == "my boxes"
    assert (users / "pred_oof_image.csv").read_text() == "my probabilities"
    for stage, settings in (("detect", boxes), ("classify", ensemble)):
        out = tmp_path / stage
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
        call(stage, "predict", out=str(out), overwrite=True, **settings)
        call(stage, "predict", out=str(out), **settings)  # its own folder now: no overwrite needed
        assert (out / "notes.txt").read_text() == "my notes"
    assert (tmp_path / "detect" / "pred_oof.csv").is_file() and (tmp_path / "classify" / "pred_oof_image.csv").is_file()
    out = tmp_path / "classify"
    listed = yaml.safe_load((out / "ensemble.yaml").read_text())["files"]
    assert "notes.txt" not in listed and {"pred_oof_image.csv", "scores_oof.csv"} <= set(listed)
    # an ensemble folder as the release before the rule left it: ensemble.yaml without siimcovid's line and files
    record = yaml.safe_load((out / "ensemble.yaml").read_text())
    (out / "ensemble.yaml").write_text(yaml.safe_dump({k: v for k, v in record.items() if k != "files"}))
    call("classify", "predict", out=str(out), **ensemble)  # no overwrite: its own folder, taken up
    assert "pred_oof_study.csv" in yaml.safe_load((out / "ensemble.yaml").read_text())["files"]
    assert (out / "notes.txt").read_text() == "my notes"


# ----------------------------------------------------------------------------- evaluate out=
@pytest.fixture
def scored(tiny_root, tmp_path) -> tuple[Path, Path]:
    """(a copy of a SIIM root the test may damage, a perfect submission of it)."""
    from test_evaluate import perfect_from_csvs

    sub = tmp_path / "sub.csv"
    perfect_from_csvs(tiny_root).to_csv(sub, index=False)
    return tiny_root, sub


def test_evaluate_out_never_replaces_a_users_file_its_submission_or_a_file_of_its_data(scored, tmp_path):
    data, sub = scored
    mine = tmp_path / "mine.json"
    mine.write_text("my results")
    sub_text = sub.read_text()
    cases = [(mine, "is a file siimcovid evaluate did not write"), (sub, "is the submission it scores")]
    cases += [(data / "train_study_level.csv", "is inside data="), (tmp_path, "is a folder")]
    for out, message in cases:
        with pytest.raises(SiimError, match=message) as e:
            call("evaluate", submission=str(sub), data=str(data), out=str(out))
        assert "\n" not in str(e.value)
    assert mine.read_text() == "my results" and sub.read_text() == sub_text
    line = one_line_error(siimcovid_cli("evaluate", f"submission={sub}", f"data={data}", f"out={mine}"))
    assert "is a file siimcovid evaluate did not write" in line and mine.read_text() == "my results"


def test_evaluate_out_replaces_its_own_scores_and_an_earlier_releases(scored, tmp_path):
    data, sub = scored
    out = tmp_path / "scores.json"
    call("evaluate", submission=str(sub), data=str(data), out=str(out))
    report = json.loads(out.read_text())
    assert report["written_by"] == "siimcovid evaluate" and report["final"] == 1.0
    call("evaluate", submission=str(sub), data=str(data), out=str(out), classes="study")  # its own: replaced
    assert json.loads(out.read_text())["final"] == 1.0
    earlier = {k: v for k, v in report.items() if k != "written_by"}  # as the release before the mark wrote it
    out.write_text(json.dumps(earlier))
    call("evaluate", submission=str(sub), data=str(data), out=str(out))
    assert json.loads(out.read_text())["written_by"] == "siimcovid evaluate"


# ----------------------------------------------------------------------------- synth overwrite=true
def synth(out: Path, **settings):
    return call("synth", out=str(out), train_studies=3, test_studies=1, rows=64, cols=64, workers=1, **settings)


def test_synth_overwrite_replaces_only_its_own_entries(tmp_path, caplog):
    out = synth(tmp_path / "d")
    (out / "notes.txt").write_text("my notes")
    (out / "prepared" / "64").mkdir(parents=True)  # prepare may write inside a SIIM root
    (out / "prepared" / "meta.csv").write_text("image_id\n")
    old_train = sorted(p.name for p in (out / "train").iterdir())
    with caplog.at_level("INFO", logger="siimcovid"):
        synth(out, overwrite=True, seed=5)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "prepared" / "meta.csv").read_text() == "image_id\n"
    assert "kept 2 entries" in caplog.text and "notes.txt, prepared" in caplog.text
    assert sorted(p.name for p in (out / "train").iterdir()) != old_train  # the other seed's studies replaced them
    assert not (tmp_path / "d.partial").exists()
    # a dataset of the release whose marker listed nothing: synth's own names are replaced, the rest kept
    (out / ".siimcovid-synth").write_text("written by siimcovid synth, seed 5\n")
    synth(out, overwrite=True)
    assert (out / "notes.txt").is_file() and (out / "prepared" / "meta.csv").is_file()
    assert sorted(p.name for p in (out / "train").iterdir()) == old_train  # seed 0 again


def test_synth_out_a_link_writes_where_it_points(tmp_path):
    target = synth(tmp_path / "d")
    link = tmp_path / "link"
    link.symlink_to(target)
    synth(link, overwrite=True, seed=5)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "train_image_level.csv").is_file() and not list(tmp_path.glob("*.partial"))

"""Outputs never destroy a user's files (siimcovid.outputs, the one rule every writing stage calls).

A stage writes into a folder that is new, empty or its own (it holds the stage's record); anything else is refused in
one line unless overwrite=true, and then only the stage's own files (those its record lists) are replaced or
removed. The root, the home folder and a folder holding the source are refused whatever the settings. Each case
plants a user's file, runs the real command and checks that the file survives.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from siimcovid.outputs import HEADER, Written, check_out, open_out
from siimcovid.utils import SiimError

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the rule itself
def test_a_new_an_empty_or_its_own_folder_may_be_written_anything_else_needs_overwrite(tmp_path):
    assert check_out(tmp_path / "new", "rec.yaml") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "rec.yaml")
    own = open_out(tmp_path / "own", "rec.yaml", "test")
    (tmp_path / "own" / "notes.txt").write_text("a user's note beside the stage's files")
    check_out(own.folder, "rec.yaml")  # its own record: a re-run is welcome, the note is not the stage's
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("years of work")
    with pytest.raises(SiimError, match=r"holds files siimcovid did not write \(e.g. thesis.txt\).*overwrite=true") as e:
        check_out(tmp_path / "mine", "rec.yaml")
    assert "\n" not in str(e.value)
    check_out(tmp_path / "mine", "rec.yaml", overwrite=True)


@pytest.mark.parametrize(
    "where, message",
    [
        ("root", "is the filesystem root"),  # / also holds the source: the root's own message shows its own check
        ("home", "is your home folder"),
        ("parent of the source", "holds the input"),
        ("the source", "holds the input"),
    ],
)
def test_the_root_the_home_folder_and_a_folder_holding_the_source_are_refused_even_with_overwrite(
    where, message, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    source = tmp_path / "data" / "dicoms"
    source.mkdir(parents=True)
    out = {"root": Path("/"), "home": tmp_path / "home", "parent of the source": source.parent, "the source": source}[where]
    with pytest.raises(SiimError, match=message) as e:
        check_out(out, "rec.yaml", overwrite=True, sources=[source])
    assert "\n" not in str(e.value)


ULTRALYTICS_PREDICT = (
    "# Ultralytics predict settings of a user's\ntask: detect\nmode: predict\nmodel: yolov8n.pt\nsource: images/\n"
    "files: [notes.txt, pictures/holiday.jpg]\n"
)


def test_a_file_named_like_a_record_that_siimcovid_did_not_write_is_never_taken_for_one(tmp_path):
    """A record is recognised by siimcovid's first line, not by its name: the user's file stays theirs, with or
    without overwrite (the stage cannot keep its record there), and its `files` are never trusted for a removal."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "predict.yaml").write_text(ULTRALYTICS_PREDICT)
    (out / "notes.txt").write_text("my notes")
    for overwrite in (False, True):
        with pytest.raises(SiimError, match=r"predict.yaml is not a record siimcovid wrote") as e:
            open_out(out, "predict.yaml", "predict", overwrite=overwrite)
        assert "\n" not in str(e.value)
    with pytest.raises(SiimError, match=r"predict.yaml is not a record siimcovid wrote"):
        Written(out, "predict.yaml", "predict").remove_all()
    assert (out / "predict.yaml").read_text() == ULTRALYTICS_PREDICT and (out / "notes.txt").read_text() == "my notes"


def test_a_stage_replaces_and_removes_only_what_its_record_lists(tmp_path):
    written = open_out(tmp_path / "out", "rec.yaml", "test")
    ours, theirs = tmp_path / "out" / "pictures" / "a.jpg", tmp_path / "out" / "pictures" / "holiday.jpg"
    theirs.parent.mkdir()
    theirs.write_bytes(b"a user's photo")
    written.claim(ours)
    ours.write_bytes(b"drawn")
    with pytest.raises(SiimError, match="holiday.jpg is not a file siimcovid test wrote"):
        written.claim(theirs)  # even in its own folder: never over a file it did not write
    again = Written(tmp_path / "out", "rec.yaml", "test")  # a re-run reads the record
    assert again.owns(ours) and not again.owns(theirs)
    assert again.remove_all("pictures") == ["pictures/a.jpg"]
    assert not ours.exists() and theirs.read_bytes() == b"a user's photo"
    assert yaml.safe_load((tmp_path / "out" / "rec.yaml").read_text()) == {"files": []}


def test_a_hostile_record_cannot_point_a_removal_outside_its_folder(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.jpg").write_text("keep too")
    out = tmp_path / "out"
    out.mkdir()
    (out / "linked").symlink_to(elsewhere)
    listed = [str(victim), "../victim.txt", "linked/x.jpg"]
    (out / "rec.yaml").write_text(HEADER.format(stage="test") + yaml.safe_dump({"files": listed}))  # siimcovid's first line
    written = Written(out, "rec.yaml", "test")
    written.remove_all()
    assert victim.read_text() == "keep" and (elsewhere / "x.jpg").read_text() == "keep too"


def siimcovid_cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real command line, for its exit code and its message."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "siimcovid", *args], capture_output=True, text=True, env=env, cwd=cwd or REPO)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


# ----------------------------------------------------------------------------- synth
def synth_settings(out: Path) -> dict:
    return {"out": str(out), "train_studies": 2, "test_studies": 1, "rows": 64, "cols": 64, "workers": 1}


def test_synth_never_deletes_a_partial_folder_it_did_not_start(tmp_path):
    partial = tmp_path / "X.partial"
    partial.mkdir()
    (partial / "thesis.txt").write_text("four years of work")
    line = one_line_error(siimcovid_cli("synth", *(f"{k}={v}" for k, v in synth_settings(tmp_path / "X").items())))
    assert "X.partial exists and was not started by `siimcovid synth`" in line
    assert (partial / "thesis.txt").read_text() == "four years of work" and not (tmp_path / "X").exists()


def test_synth_replaces_the_partial_an_interrupted_synth_left(tmp_path):
    from siimcovid.cli import call
    from siimcovid.data.synth import MARKER, start_partial

    out = tmp_path / "X"
    interrupted = start_partial(out, out / "train_image_level.csv", overwrite=False)  # synth's first step, then a kill
    assert (interrupted / MARKER).is_file() and list(interrupted.iterdir()) == [interrupted / MARKER]
    (interrupted / "train").mkdir()
    call("synth", **synth_settings(out))
    assert (out / "train_image_level.csv").is_file() and not interrupted.exists()


def test_synth_refuses_the_home_folder_even_when_empty(tmp_path, monkeypatch):
    from siimcovid.cli import call

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    with pytest.raises(SiimError, match="is your home folder"):
        call("synth", **synth_settings(tmp_path / "home"))
    assert list((tmp_path / "home").iterdir()) == []


# ----------------------------------------------------------------------------- fuse and fuse tune
@pytest.fixture
def fuse_inputs(prepared, tmp_path) -> list[str]:
    """A detection and a classifier table of the prepared out-of-fold images (tests/test_fuse.py's constructions)."""
    from test_fuse import classifier, exact_detections, truth_images

    images = truth_images(prepared, "oof")
    exact_detections(images).to_csv(tmp_path / "det.csv", index=False)
    classifier(images).to_csv(tmp_path / "cls.csv", index=False)
    return [f"data={prepared}", f"det={tmp_path / 'det.csv'}", f"cls={tmp_path / 'cls.csv'}", "split=oof", "workers=1"]


def fuse(*args: str, project: Path, name: str = "mine"):
    from siimcovid import cli

    return cli.main(["fuse", *args, f"project={project}", f"name={name}"])


def test_fuse_refuses_a_folder_of_the_users_files_and_writes_beside_them_with_overwrite(fuse_inputs, tmp_path):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    with pytest.raises(SiimError, match=r"holds files siimcovid did not write \(e.g. notes.txt\)") as e:
        fuse(*fuse_inputs, project=tmp_path / "runs")
    assert "\n" not in str(e.value) and sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    fuse(*fuse_inputs, "overwrite=true", project=tmp_path / "runs")
    again = fuse(*fuse_inputs, project=tmp_path / "runs")  # its own folder now: a re-run needs no overwrite
    assert (again["dir"] / "scores_oof.json").is_file() and (folder / "notes.txt").read_text() == "my notes"
    listed = yaml.safe_load((folder / "fuse_files.yaml").read_text())["files"]
    assert "notes.txt" not in listed and "scores_oof.json" in listed


def test_fuse_and_tune_never_overwrite_a_file_of_the_users_even_with_overwrite(fuse_inputs, tmp_path):
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    (folder / "best.yaml").write_text("iou_thr: 0.5  # tuned by hand\n")
    (folder / "scores_oof.csv").write_text("my own scores\n")
    with pytest.raises(SiimError, match="scores_oof.csv is not a file siimcovid fuse wrote"):
        fuse(*fuse_inputs, "overwrite=true", project=tmp_path / "runs")
    with pytest.raises(SiimError, match="best.yaml is not a file siimcovid fuse wrote"):
        fuse("tune", *fuse_inputs, "trials=1", "overwrite=true", project=tmp_path / "runs")
    assert (folder / "best.yaml").read_text() == "iou_thr: 0.5  # tuned by hand\n"
    assert (folder / "scores_oof.csv").read_text() == "my own scores\n"


def test_fuse_refuses_a_folder_that_holds_its_inputs(fuse_inputs, tmp_path):
    with pytest.raises(SiimError, match="holds the input"):
        fuse(*fuse_inputs, "overwrite=true", project=tmp_path.parent, name=tmp_path.name)  # det.csv is in there
    assert not (tmp_path / "fuse_files.yaml").exists()


@pytest.mark.parametrize("made_by", [("tune",), ("tune", "fuse oof", "fuse test")])
def test_fuse_and_tune_take_up_a_folder_the_previous_release_wrote(made_by, fuse_inputs, prepared, tmp_path):
    """<project>/<name>/ as the release before the outputs rule left it (its config records, no fuse_files.yaml): a
    re-run of `siimcovid run` fuses and tunes there again, without overwrite; a user's file beside them stays."""
    project, folder = tmp_path / "runs", tmp_path / "runs" / "mine"
    test_inputs = [a.replace("split=oof", "split=test").replace(".csv", "_test.csv") for a in fuse_inputs]
    test_inputs.append(f"sample={tmp_path / 'sample.csv'}")
    if "fuse test" in made_by:
        from test_fuse import classifier, exact_detections, truth_images

        from siimcovid.predict.source import write_sample

        images = truth_images(prepared, "test")
        write_sample(images, tmp_path / "sample.csv")
        exact_detections(images).to_csv(tmp_path / "det_test.csv", index=False)
        classifier(images).to_csv(tmp_path / "cls_test.csv", index=False)
    runs = {"tune": ("tune", *fuse_inputs, "trials=1"), "fuse oof": fuse_inputs, "fuse test": test_inputs}
    for step in made_by:
        fuse(*runs[step], project=project)
    (folder / "fuse_files.yaml").unlink()  # the previous release kept no record
    (folder / "notes.txt").write_text("my notes")
    if "fuse test" in made_by:
        fuse(*test_inputs, project=project)
    else:
        fuse("tune", *fuse_inputs, "trials=1", project=project)
    listed = yaml.safe_load((folder / "fuse_files.yaml").read_text())["files"]
    assert {"tune.yaml", "trials.csv", "best.yaml"} <= set(listed) and "notes.txt" not in listed
    assert (folder / "notes.txt").read_text() == "my notes"


def test_fuse_does_not_take_a_users_folder_for_a_previous_releases(fuse_inputs, tmp_path):
    """Only fuse's own config record is evidence: a user's fuse_oof.yaml (not fuse's settings) is not."""
    folder = tmp_path / "runs" / "mine"
    folder.mkdir(parents=True)
    (folder / "fuse_oof.yaml").write_text("my: own settings\n")
    with pytest.raises(SiimError, match="holds files siimcovid did not write"):
        fuse(*fuse_inputs, project=tmp_path / "runs")
    assert sorted(p.name for p in folder.iterdir()) == ["fuse_oof.yaml"]


# ----------------------------------------------------------------------------- pseudo
def run_pseudo(prepared, base: Path, out, **settings):
    from test_pseudo import fake_teachers, run_pseudo

    det, cls = fake_teachers(prepared, base)
    return run_pseudo(det, cls, out, sizes=[64], **settings)


def test_pseudo_refuses_the_root_the_home_folder_a_folder_holding_its_inputs_and_a_users_folder(prepared, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "labels.csv").write_text("a user's labels")
    mine = tmp_path / "mine"
    (mine / "64").mkdir(parents=True)
    (mine / "64" / "thesis.txt").write_text("four years of work")
    cases = [("/", "is the filesystem root"), (tmp_path / "home", "is your home folder")]
    cases += [(tmp_path / "t", "holds the input"), (mine, r"holds files siimcovid did not write \(e.g. 64/\)")]
    for out, message in cases:
        with pytest.raises(SiimError, match=message) as e:
            run_pseudo(prepared, tmp_path / "t", out)
        assert "\n" not in str(e.value)
    assert (tmp_path / "home" / "labels.csv").read_text() == "a user's labels"
    assert (mine / "64" / "thesis.txt").read_text() == "four years of work" and sorted(os.listdir(mine)) == ["64"]
    run_pseudo(prepared, tmp_path / "t", mine, overwrite=True)  # beside the user's files, which stay
    assert (mine / "64" / "thesis.txt").read_text() == "four years of work" and (mine / "labels.csv").is_file()


def test_pseudo_replaces_and_removes_only_its_own_files(prepared, tmp_path):
    out = run_pseudo(prepared, tmp_path, tmp_path / "pseudo")
    user = {"notes.txt": "notes", "teachers/mine.csv": "my predictions", "64/fold0/images/mine.png": "my image"}
    for rel, text in user.items():
        (out / rel).write_text(text)
    before = yaml.safe_load((out / "pseudo_files.yaml").read_text())["files"]
    run_pseudo(prepared, tmp_path, out, teacher="all", det_tta=False)  # other settings: cache and labels are redone
    assert all((out / rel).read_text() == text for rel, text in user.items())
    after = yaml.safe_load((out / "pseudo_files.yaml").read_text())["files"]
    assert "64/fold-1.txt" in after and "64/fold0.txt" in before and not set(user) & set(after)


def test_pseudo_takes_up_a_folder_the_previous_release_wrote(prepared, tmp_path):
    out = run_pseudo(prepared, tmp_path, tmp_path / "pseudo")
    (out / "pseudo_files.yaml").unlink(missing_ok=True)  # the previous release kept no record
    (out / "notes.txt").write_text("my notes")
    run_pseudo(prepared, tmp_path, out, teacher="all")
    listed = yaml.safe_load((out / "pseudo_files.yaml").read_text())["files"]
    assert {"labels.csv", "prepare.yaml", "64/fold-1.txt", "teachers/teachers.yaml"} <= set(listed)
    assert "notes.txt" not in listed and (out / "notes.txt").read_text() == "my notes"
    assert not (out / "64" / "fold0.txt").exists()  # the previous release's labels: adopted, so replaced


# ----------------------------------------------------------------------------- predict
def test_predict_refuses_the_root_the_home_folder_and_a_folder_holding_the_source(tmp_path, monkeypatch):
    """Refused before the bundle is even opened (none is needed here), overwrite=true or not."""
    from siimcovid.cli import call

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    pictures = tmp_path / "D" / "pictures"
    pictures.mkdir(parents=True)
    (pictures / "scan0.jpg").write_bytes(b"the user's scan")
    for out, message in [("/", "filesystem root"), (tmp_path / "home", "home folder"), (tmp_path / "D", "holds the input")]:
        with pytest.raises(SiimError, match=message):
            call("predict", bundle=str(tmp_path / "no-bundle"), source=str(pictures), out=str(out), overwrite=True)
    assert sorted(p.name for p in (tmp_path / "D").rglob("*")) == ["pictures", "scan0.jpg"]
    assert list((tmp_path / "home").iterdir()) == []


def test_predict_into_a_folder_of_the_users_files_is_one_line_and_touches_nothing(tmp_path):
    out = tmp_path / "out"
    (out / "pictures").mkdir(parents=True)
    (out / "pictures" / "holiday.jpg").write_bytes(b"a user's photo")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.dcm").write_bytes(b"whatever: refused before it is read")
    args = (f"bundle={tmp_path / 'no-bundle'}", f"source={tmp_path / 'src'}", f"out={out}")
    line = one_line_error(siimcovid_cli("predict", *args))
    assert "holds files siimcovid did not write (e.g. pictures/)" in line and "overwrite=true" in line
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["pictures", "pictures/holiday.jpg"]


try:  # a bundle exported from hand-built runs of small real checkpoints (tests/test_bundle.py): seconds, no training
    from test_bundle import bundle, runs, yolo_checkpoint  # noqa: F401
except ImportError:  # pragma: no cover
    bundle = None


def dicom_folder(synth_root: Path, folder: Path, n: int = 3) -> Path:
    import shutil

    folder.mkdir(parents=True)
    for k, dicom in enumerate(sorted((synth_root / "test").rglob("*.dcm"))[:n]):
        shutil.copy(dicom, folder / f"img{k}.dcm")
    return folder


def predict(bundle, source, out, **settings):
    from siimcovid.cli import call

    return call("predict", bundle=str(bundle), source=str(source), out=str(out), workers=0, device="cpu", **settings)


def test_predict_with_overwrite_writes_beside_the_users_files_and_removes_only_its_own(bundle, synth_root, tmp_path):
    source, out = dicom_folder(synth_root, tmp_path / "src"), tmp_path / "out"
    user = {"pictures/holiday.jpg": b"a user's photo", "notes.txt": b"notes", "fuse/notes.txt": b"more notes"}
    for rel, data in user.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    first = predict(bundle, source, out, overwrite=True)
    record = yaml.safe_load((out / "predict.yaml").read_text())
    drawn = sorted(f"pictures/{Path(p).name}" for p in pd_read(first["view"]["images"]).picture)
    assert [f for f in record["files"] if f.startswith("pictures/")] == drawn  # the record lists what predict drew
    assert not set(user) & set(record["files"])

    (out / "pictures" / "new.jpg").write_bytes(b"dropped in after the first run")
    predict(bundle, source, out)  # its own folder: the re-run resumes, without overwrite
    assert all((out / rel).read_bytes() == data for rel, data in user.items())
    assert (out / "pictures" / "new.jpg").is_file()

    (out / "detect" / "mine.txt").write_text("a user's file beside the tables")
    predict(rebuilt(bundle, tmp_path / "other"), source, out)  # another bundle: the first one's tables go, not the user's
    assert (out / "detect" / "mine.txt").read_text() == "a user's file beside the tables"
    assert all((out / rel).read_bytes() == data for rel, data in user.items())
    expected = sorted(["holiday.jpg", "new.jpg", *(Path(p).name for p in drawn)])
    assert sorted(p.name for p in (out / "pictures").iterdir()) == expected


def test_predict_never_overwrites_a_users_file_named_like_its_output(bundle, synth_root, tmp_path):
    source, out = dicom_folder(synth_root, tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("<p>my own page</p>")
    with pytest.raises(SiimError, match="index.html is not a file siimcovid predict wrote"):
        predict(bundle, source, out, overwrite=True)
    assert (out / "index.html").read_text() == "<p>my own page</p>"
    assert not (out / "prepared").exists()  # stopped before any work


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def rebuilt(bundle: Path, copy: Path) -> Path:
    """The same models as another bundle (another manifest checksum)."""
    import shutil

    copy = Path(shutil.copytree(bundle, copy))
    manifest = yaml.safe_load((copy / "manifest.yaml").read_text())
    manifest["created"] = "another time"
    (copy / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return copy


def test_predict_never_takes_a_users_predict_yaml_for_its_record(bundle, synth_root, tmp_path):
    """An Ultralytics-style predict.yaml of the user's: the folder is not predict's (no overwrite: refused), and with
    overwrite=true predict cannot keep its record there (refused too); the file and the photo its `files` names stay."""
    source, out = dicom_folder(synth_root, tmp_path / "src"), tmp_path / "out"
    (out / "pictures").mkdir(parents=True)
    (out / "pictures" / "holiday.jpg").write_bytes(b"a user's photo")
    (out / "predict.yaml").write_text(ULTRALYTICS_PREDICT)
    for overwrite in (False, True):
        with pytest.raises(SiimError, match="predict.yaml is not a record siimcovid wrote") as e:
            predict(bundle, source, out, overwrite=overwrite)
        assert "\n" not in str(e.value)
    assert (out / "predict.yaml").read_text() == ULTRALYTICS_PREDICT
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["pictures", "pictures/holiday.jpg", "predict.yaml"]


def as_previous_release_left_it(out: Path) -> None:
    """A predict out= as the release before the outputs rule (86e827c) left it: predict.yaml without siimcovid's first
    line and without `files`, no record of fuse's (fuse_files.yaml) or prepare's (prepare_files.yaml), the sample
    submission in fuse/."""
    data = yaml.safe_load((out / "predict.yaml").read_text())
    del data["files"]
    (out / "predict.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (out / "fuse" / "fuse_files.yaml").unlink()
    (out / "prepared" / "prepare_files.yaml").unlink()
    os.replace(out / "sample_submission.csv", out / "fuse" / "sample_submission.csv")


@pytest.mark.parametrize("overwrite", [False, True])
def test_predict_takes_up_a_folder_the_previous_release_wrote_and_resumes(overwrite, bundle, synth_root, tmp_path, caplog):
    source, out = dicom_folder(synth_root, tmp_path / "src"), tmp_path / "out"
    first = predict(bundle, source, out)
    as_previous_release_left_it(out)
    (out / "pictures" / "holiday.jpg").write_bytes(b"a user's photo, dropped in later")
    with caplog.at_level("INFO", logger="siimcovid"):
        predict(bundle, source, out, overwrite=overwrite)
    assert caplog.text.count("reusing") == 2  # the members' tables: predict.yaml's members vouch for them
    record = yaml.safe_load((out / "predict.yaml").read_text())
    drawn = sorted(f"pictures/{Path(p).name}" for p in pd_read(first["view"]["images"]).picture)
    assert {"studies.csv", "index.html", "sample_submission.csv", *drawn} <= set(record["files"])
    assert "pictures/holiday.jpg" not in record["files"] and (out / "pictures" / "holiday.jpg").is_file()
    assert not (out / "fuse" / "sample_submission.csv").exists()  # the previous release's, replaced by <out>/'s
    fuse_listed = yaml.safe_load((out / "fuse" / "fuse_files.yaml").read_text())["files"]
    assert "submission.csv" in fuse_listed and "fuse_test.yaml" in fuse_listed


def test_predict_overwrite_reaches_its_prepare(bundle, synth_root, tmp_path):
    """overwrite=true lets predict write beside a user's files in out=, <out>/prepared/ included."""
    source, out = dicom_folder(synth_root, tmp_path / "src"), tmp_path / "out"
    (out / "prepared").mkdir(parents=True)
    (out / "prepared" / "notes.txt").write_text("a user's notes")
    predict(bundle, source, out, overwrite=True)
    assert (out / "prepared" / "notes.txt").read_text() == "a user's notes" and (out / "prepared" / "meta.csv").is_file()
    assert "notes.txt" not in yaml.safe_load((out / "prepared" / "prepare_files.yaml").read_text())["files"]


def test_a_folder_of_the_out_that_links_elsewhere_is_never_written_through(tmp_path):
    """out/pictures -> a user's photo folder: the drawings would land among the photos."""
    from siimcovid.outputs import open_out

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_text("a cat")
    out = tmp_path / "out"
    out.mkdir()
    (out / "pictures").symlink_to(photos)
    written = open_out(out, "record.yaml", "predict", overwrite=True)
    with pytest.raises(SiimError, match=r"pictures leads out of .*out \(a symbolic link\): siimcovid predict writes only"):
        written.claim(out / "pictures" / "new.jpg")
    assert sorted(p.name for p in photos.iterdir()) == ["cat.jpg"] and "pictures/new.jpg" not in written.files

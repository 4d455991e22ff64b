"""Hostile or careless input to the tables and the outputs (issue 17): a duplicated row, a CSV or YAML that is not
UTF-8, a FIFO or /dev/zero given as a file, a file far too large for its format, a full or read-only out."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid import cli, tables
from siimcovid.data.prepared import Prepared
from siimcovid.tables import (
    CLASSIFIER_IMAGES,
    COMPETITION_CSV_MAX_BYTES,
    DETECTIONS,
    FLOAT,
    INT,
    JSON,
    STUDY_CLASSES,
    SUBMISSION,
    Table,
)
from siimcovid.utils import DataError, SiimError, atomic_path, atomic_write_text

SIIMCOVID = Path(sys.executable).with_name("siimcovid")
LATIN = "Ren\xe9".encode("latin-1")  # what Excel on Windows saves: not UTF-8


def run_cli(args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """The console script, as a user runs it (exit code and the one line matter)."""
    return subprocess.run([str(SIIMCOVID), *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [t for t in result.stderr.splitlines() if t.startswith("siimcovid: error:")]
    return line


def temporaries(folder: Path) -> list[Path]:
    """Temporary files atomic_path / temp_dir_beside leave behind if a write is not cleaned up."""
    return [p for p in Path(folder).rglob(".*") if ".tmp" in p.name]


def classifier_rows(prepared, split="train") -> pd.DataFrame:
    meta = Prepared(prepared).split(split)
    probs = {c: 0.25 for c in STUDY_CLASSES}
    out = pd.DataFrame({"image_id": meta.image_id, "study_id": meta.study_id, **probs, "none": 0.5})
    return out.assign(fold=meta.fold.to_numpy()) if split == "train" else out


def fuse(prepared, tmp_path, *args) -> object:
    return cli.main(["fuse", f"data={prepared}", *args, f"project={tmp_path / 'runs'}", "name=f", "workers=1"])


# ----------------------------------------------------------------------------- duplicates by key
def test_conflicting_classifier_rows_are_an_error_naming_both_lines(prepared, tmp_path):
    cls = classifier_rows(prepared)
    twice = cls.iloc[[3]].assign(negative=0.97, typical=0.01, indeterminate=0.01, atypical=0.01)  # the same image again
    pd.concat([cls, twice], ignore_index=True).to_csv(tmp_path / "dup.csv", index=False)
    image, fold = cls.image_id.iloc[3], cls.fold.iloc[3]
    message = rf"dup.csv, line {len(cls) + 2}: duplicate image_id '{image}', fold {fold} \(first on line 5\)"
    with pytest.raises(DataError, match=message):
        fuse(prepared, tmp_path, f"cls={tmp_path / 'dup.csv'}", "split=oof")
    assert not (tmp_path / "runs" / "f" / "pred_oof.csv").exists()
    # one image from two models (or two folds) is what fusion averages: not a duplicate
    other = cls.assign(model="b", negative=0.7, typical=0.1, atypical=0.1, indeterminate=0.1)
    two_models = pd.concat([cls.assign(model="a"), other])
    two_models.to_csv(tmp_path / "two.csv", index=False)
    fuse(prepared, tmp_path, f"cls={tmp_path / 'two.csv'}", "split=oof")
    fused = pd.read_csv(tmp_path / "runs" / "f" / "studies_oof.csv")
    assert np.allclose(fused.negative, (0.25 + 0.7) / 2)


def one_row(table: Table) -> dict:
    """A row every column check of the contract accepts."""
    value = {INT: 1, FLOAT: 0.5, JSON: "[]"}
    return {c.name: value.get(c.dtype, "all" if c.name == "fold" else "a") for c in table.columns}


KEYED = {name: t for name, t in vars(tables).items() if isinstance(t, Table) and t.key}


def test_which_contracts_have_a_key():
    assert {n: t.key for n, t in KEYED.items()} == {
        "META": ("image_id",),
        "LUNG_BOXES": ("image_id",),
        "CLASSIFIER_IMAGES": ("image_id", "fold", "model"),
        "CLASSIFIER_STUDIES": ("study_id", "fold", "model"),
        "NONE_IMAGES": ("image_id", "fold", "model"),
        "DISTILL_TARGETS": ("image_id",),
        "FUSED_IMAGES": ("image_id",),
        "FUSED_STUDIES": ("study_id",),
        "SUBMISSION": ("id",),
        "SAMPLE": ("id",),
        "EXTERNAL_LABELS": ("image_id",),
        "SCORES": ("fold", "model"),
        "CLASSIFIER_FOLDS": ("image_id", "fold", "model"),
        "PSEUDO_LABELS": ("image_id", "fold"),
        "COPIES": ("image_id",),
        "PREDICTED_STUDIES": ("study_id",),
        "PREDICTED_IMAGES": ("image_id",),
        "DICOM_RESULTS": ("sop_instance_uid",),
    }
    for table in KEYED.values():
        assert set(table.key) <= set(table.names)


@pytest.mark.parametrize("name", sorted(KEYED))
def test_every_keyed_contract_refuses_a_duplicate_on_read_and_on_write(name, tmp_path):
    table = KEYED[name]
    row = one_row(table)
    other = {**row, table.key[0]: "b" if isinstance(row[table.key[0]], str) else 2}
    frame = pd.DataFrame([row, other, row])
    frame.to_csv(tmp_path / "t.csv", index=False)
    first = ", ".join(f"{c} {row[c]!r}" if isinstance(row[c], str) else f"{c} {row[c]}" for c in table.key)
    with pytest.raises(DataError, match=rf"t.csv, line 4: duplicate {first} \(first on line 2\)"):
        table.read(tmp_path / "t.csv")
    with pytest.raises(SiimError, match=r"out.csv: not written: its rows 1 and 3 share .*a bug of siimcovid"):
        table.write(frame, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists() and not temporaries(tmp_path)
    assert len(table.read(table.write(frame.iloc[:2], tmp_path / "ok.csv"))) == 2


def test_tables_of_many_rows_per_image_have_no_key(tmp_path):
    boxes = pd.DataFrame([one_row(DETECTIONS) | {"x_max": 2.0, "y_max": 2.0, "conf": c} for c in (0.5, 0.5)])
    assert len(DETECTIONS.read(DETECTIONS.write(boxes, tmp_path / "d.csv"))) == 2  # two boxes of one image, same fold


# ----------------------------------------------------------------------------- not UTF-8
def latin1_copy(src: Path, dst: Path, line: int = 2) -> Path:
    """A copy of a CSV whose first field on `line` gets a Windows-1252 byte."""
    lines = src.read_bytes().split(b"\n")
    first, _, rest = lines[line - 1].partition(b",")
    lines[line - 1] = first + LATIN + b"," + rest
    dst.write_bytes(b"\n".join(lines))
    return dst


def test_csvs_that_are_not_utf8_are_one_error_naming_the_file_and_line(synth_root, prepared, tmp_path):
    cls = classifier_rows(prepared)
    cls.to_csv(tmp_path / "cls.csv", index=False)
    meta = Prepared(prepared).split("train")
    det = pd.DataFrame({"image_id": meta.image_id, "model": "m", "fold": meta.fold, "x_min": 1.0, "y_min": 1.0,
                        "x_max": 9.0, "y_max": 9.0, "conf": 0.5})  # fmt: skip
    det.to_csv(tmp_path / "det.csv", index=False)
    bad = re.escape("not UTF-8 text (byte 0xe9 on line 3): save it as UTF-8")
    with pytest.raises(DataError, match=f"cls_latin.csv: {bad}"):
        fuse(prepared, tmp_path, f"cls={latin1_copy(tmp_path / 'cls.csv', tmp_path / 'cls_latin.csv', 3)}", "split=oof")
    with pytest.raises(DataError, match=f"det_latin.csv: {bad}"):
        fuse(prepared, tmp_path, f"det={latin1_copy(tmp_path / 'det.csv', tmp_path / 'det_latin.csv', 3)}", "split=oof")
    classifier_rows(prepared, "test").to_csv(tmp_path / "cls_test.csv", index=False)
    sample = latin1_copy(synth_root / "sample_submission.csv", tmp_path / "sample.csv", 3)
    with pytest.raises(DataError, match=f"sample.csv: {bad}"):
        fuse(prepared, tmp_path, f"cls={tmp_path / 'cls_test.csv'}", "split=test", f"sample={sample}")
    submission = latin1_copy(synth_root / "sample_submission.csv", tmp_path / "submission.csv", 3)
    with pytest.raises(DataError, match=f"submission.csv: {bad}"):
        cli.main(["evaluate", f"submission={submission}", f"data={synth_root}", "split=test"])
    # the truth: a SIIM root whose train_study_level.csv went through Excel
    root = tmp_path / "root"
    root.mkdir()
    for name in ("train_image_level.csv", "sample_submission.csv"):
        (root / name).write_bytes((synth_root / name).read_bytes())
    latin1_copy(synth_root / "train_study_level.csv", root / "train_study_level.csv", 3)
    (root / "train").symlink_to(synth_root / "train")
    oof = tmp_path / "oof.csv"
    pd.DataFrame({"id": [f"{s}_study" for s in meta.study_id.unique()[:1]],
                  "PredictionString": "negative 1 0 0 1 1"}).to_csv(oof, index=False)  # fmt: skip
    with pytest.raises(DataError, match=f"train_study_level.csv: {bad}"):
        cli.main(["evaluate", f"submission={oof}", f"data={root}"])


def test_siimcovid_runs_lists_an_unreadable_run_as_such_and_the_others(tmp_path, caplog):
    project = tmp_path / "runs"
    good = {"model": "yolov5n.yaml", "imgsz": 128, "epochs": 3}
    for name in ("good", "latin", "broken", "fifo"):
        (project / "detect" / name).mkdir(parents=True)
    (project / "detect" / "good" / "detect.yaml").write_text(yaml.safe_dump(good))
    (project / "detect" / "latin" / "detect.yaml").write_bytes(b"model: " + LATIN + b".yaml\nimgsz: 128\n")
    (project / "detect" / "broken" / "detect.yaml").write_text("model: [yolov5n.yaml\nimgsz: 128\n")
    os.mkfifo(project / "detect" / "fifo" / "detect.yaml")  # read, it would block `runs` forever
    cls = project / "classify" / "r10"
    cls.mkdir(parents=True)
    (cls / "classify.yaml").write_text(yaml.safe_dump({"model": "resnet10t", "imgsz": 64}))
    (cls / "scores_oof.csv").write_bytes(b"fold,n_images,n_studies,final,model\nall,3,3,0.5," + LATIN + b"\n")

    table = cli.call("runs", project=str(project), format="csv")
    rows = {r.name: r for r in table.itertuples()}
    assert set(rows) == {"good", "latin", "broken", "fifo", "r10"}
    assert rows["good"].model == "yolov5n.yaml" and rows["good"].cv == ""
    assert rows["latin"].cv == "unreadable: detect.yaml: not UTF-8 text (byte 0xe9 on line 1): save it as UTF-8"
    assert rows["broken"].cv.startswith("unreadable: detect.yaml, line 2: not valid YAML")
    assert rows["fifo"].cv == "unreadable: detect.yaml: a FIFO (named pipe), not a YAML file: give a file"
    assert rows["r10"].model == "resnet10t" and rows["r10"].cv == ""  # a bad score table: the row without its score
    assert "r10/scores_oof.csv: not UTF-8 text" in caplog.text


# ----------------------------------------------------------------------------- not a file, too large
@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_a_submission_that_is_no_regular_file_is_refused_not_read(kind, synth_root, tmp_path):
    path = {"dev_zero": Path("/dev/zero"), "fifo": tmp_path / "sub.csv", "folder": tmp_path}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    what = {"dev_zero": "a character device", "fifo": "a FIFO (named pipe)", "folder": "a folder"}[kind]
    result = run_cli(["evaluate", f"submission={path}", f"data={synth_root}", "split=test"], timeout=60)  # today: forever
    assert one_error_line(result) == f"siimcovid: error: {path}: {what}, not a submission file: give a file"


def test_a_submission_larger_than_any_real_one_is_refused_before_it_is_read(synth_root, tmp_path):
    big = tmp_path / "huge.csv"
    with open(big, "wb") as f:
        f.write(b"id,PredictionString\n")
        f.truncate(COMPETITION_CSV_MAX_BYTES + 1)  # sparse: no disk used
    with pytest.raises(DataError, match=r"huge.csv: larger than 256 MiB, the most a submission file can be"):
        cli.main(["evaluate", f"submission={big}", f"data={synth_root}", "split=test"])
    assert SUBMISSION.max_bytes == COMPETITION_CSV_MAX_BYTES and CLASSIFIER_IMAGES.max_bytes is None


# ----------------------------------------------------------------------------- a full or read-only out
def test_a_disk_that_fills_during_a_write_is_one_line_and_leaves_no_temporary(prepared, tmp_path, monkeypatch):
    """Simulated (tests run as root, and no small filesystem can be mounted here): to_csv writes half the file, then
    the disk is full, as the kernel reports it (OSError ENOSPC, no file name)."""
    real = pd.DataFrame.to_csv

    def fills_up(self, path=None, *args, **kwargs):
        if path is None:
            return real(self, path, *args, **kwargs)
        Path(path).write_text(real(self, None, *args, **kwargs)[:50])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    classifier_rows(prepared).to_csv(tmp_path / "cls.csv", index=False)
    monkeypatch.setattr(pd.DataFrame, "to_csv", fills_up)
    out = tmp_path / "runs" / "f"
    with pytest.raises(SiimError, match=rf"^cannot write {out}/\w+_oof.csv: no space left on device$"):
        fuse(prepared, tmp_path, f"cls={tmp_path / 'cls.csv'}", "split=oof")
    assert not temporaries(tmp_path) and not list(out.glob("*.csv"))


def test_a_read_only_out_is_one_line(synth_root, tmp_path, monkeypatch, caplog):
    """Simulated with the errors a read-only filesystem gives (EROFS), at the folder and at the file: as root,
    chmod does not stop a write."""
    sub = tmp_path / "sub.csv"
    sub.write_bytes((synth_root / "sample_submission.csv").read_bytes())  # a valid submission of every test id
    real_mkdir = os.mkdir

    def read_only_mkdir(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only_mkdir)
    report = tmp_path / "ro" / "scores" / "report.json"
    monkeypatch.setattr("sys.argv", ["siimcovid", "evaluate", f"submission={sub}", f"data={synth_root}", "split=test",
                                     f"out={report}"])  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint()
    assert exited.value.code == 2
    assert f"siimcovid: error: cannot write {report}: read-only file system" in caplog.text
    # an OSError outside atomic_path (a stage making its own folder) reaches the entry point: one line too
    caplog.clear()
    monkeypatch.setattr("siimcovid.cli.main", lambda: os.mkdir(tmp_path / "ro" / "fuse"))
    with pytest.raises(SystemExit) as exited:
        cli.entrypoint()
    assert exited.value.code == 2
    assert f"siimcovid: error: cannot write {tmp_path / 'ro' / 'fuse'}: read-only file system" in caplog.text
    # any other OSError is a bug of ours: it keeps its traceback
    monkeypatch.setattr("siimcovid.cli.main", lambda: os.rmdir(tmp_path / "nothing"))
    with pytest.raises(FileNotFoundError):
        cli.entrypoint()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE as Linux enforces it")
def test_a_real_file_size_limit_is_one_line_and_leaves_no_temporary(synth_root, tmp_path):
    """A real kernel refusal (no simulation): `ulimit -f` makes every write past it fail with EFBIG, as a full disk
    fails with ENOSPC (Python ignores the SIGXFSZ that comes with it)."""
    import resource

    sub = tmp_path / "sub.csv"
    sub.write_bytes((synth_root / "sample_submission.csv").read_bytes())  # a valid submission of every test id
    out = tmp_path / "out"
    out.mkdir()

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))

    result = run_cli(["evaluate", f"submission={sub}", f"data={synth_root}", "split=test", f"out={out / 'r.json'}"],
                     preexec_fn=small_files)  # fmt: skip
    assert one_error_line(result) == f"siimcovid: error: cannot write {out / 'r.json'}: file too large"
    assert not list(out.iterdir())  # no report, no temporary


def test_atomic_helpers_name_the_path_and_clean_up(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b.txt"
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
    with pytest.raises(SiimError, match=rf"^cannot write {target}: disk quota exceeded$"):
        atomic_write_text(target, "x")
    assert not list((tmp_path / "a").iterdir())
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(SiimError, match=rf"cannot write {tmp_path / 'file' / 'c' / 'd.txt'}: {tmp_path / 'file'} is a file"):
        atomic_write_text(tmp_path / "file" / "c" / "d.txt", "x")
    with pytest.raises(SiimError, match=rf"cannot write {tmp_path / 'a'}: is a directory"):
        atomic_write_text(tmp_path / "a", "x")
    # an error of the block about another file (an input it reads) keeps its own file and type
    with pytest.raises(PermissionError), atomic_path(tmp_path / "c.txt"):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "input.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "file"]


def test_a_csv_with_a_header_of_a_million_columns_is_refused_at_once(tmp_path):
    """1 MiB, far under any size limit, but pandas would spend minutes and gigabytes on its header."""
    from siimcovid.tables import MAX_COLUMNS, SUBMISSION

    path = tmp_path / "wide.csv"
    path.write_text("id,PredictionString" + "," * (1 << 20) + "\n")
    with pytest.raises(DataError, match=rf"wide.csv: 1048578 columns on its first line \(.* at most {MAX_COLUMNS}\)"):
        SUBMISSION.read(path)


@pytest.mark.parametrize("image_id", ["../../escape", "a/b", "..", "c\\d"])
def test_a_meta_table_whose_image_id_is_a_path_is_refused_naming_the_file_and_line(prepared, tmp_path, image_id):
    """Image ids name files (prepared images, a distilled student's labels, pseudo's folders): a hostile meta.csv whose
    id leaves its folder is refused on read, before any file is written by it."""
    meta = tables.META.read(Path(prepared) / "meta.csv")
    meta.loc[3, "image_id"] = image_id
    path = tmp_path / "meta.csv"
    meta.to_csv(path, index=False)
    with pytest.raises(DataError, match=r"meta.csv, line 5: image_id is not a file name"):
        tables.META.read(path)

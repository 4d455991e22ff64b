"""Every artifact declared once (siimcovid.artifacts): the fusion record fuse writes and export reads, the bundle's
files, each written and read with one declaration.

The runs are tests/test_bundle.py's (hand-built run folders with prediction tables, fused for real); a test that
changes a file works on a copy.
"""

# ruff: noqa: F811  (runs, yolo_checkpoint: fixtures of test_bundle.py, imported, then test arguments)
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml
from test_bundle import export, fake_predictions, runs, yolo_checkpoint  # noqa: F401  (fixtures)

from siimcovid.cli import call
from siimcovid.fuse.record import FUSION_RECORD, NAME
from siimcovid.utils import SiimError


def copy_runs(runs: Path, tmp_path: Path, names=("detect/x", "classify/x")) -> Path:
    """A project of copies of some of the session's runs (their prediction tables, which a test may change)."""
    project = tmp_path / "runs"
    for name in names:
        shutil.copytree(runs / name, project / name)
    return project


def fuse_test(project: Path, prepared: Path, name: str, det: list[str], cls: list[str], **params) -> Path:
    det = [str(project / f"detect/{d}/pred_test.csv") for d in det]
    cls = [str(project / f"classify/{c}/pred_test_image.csv") for c in cls]
    return call("fuse", split="test", det=det, cls=cls, data=str(prepared), project=str(project / "fuse"), name=name,
                workers=1, **params)["dir"]  # fmt: skip


def export_of(project: Path, fuse: Path, out: Path, det=("x",), cls=("x",)) -> Path:
    detect, classify = [str(project / f"detect/{d}") for d in det], [str(project / f"classify/{c}") for c in cls]
    return export(project, detect=detect, classify=classify, fuse=str(fuse), out=str(out))


# ----------------------------------------------------------------------------- the fusion record
def test_fuse_records_the_member_order_the_files_fused_and_every_parameter(runs, prepared, tmp_path):
    project = copy_runs(runs, tmp_path, ("detect/v5a", "detect/v5b", "classify/b3"))
    folder = fuse_test(project, prepared, "ens", ["v5b", "v5a"], ["b3"], det_weights=[2.0, 1.0], iou_thr=0.5)
    text = (folder / NAME).read_text()
    assert text.startswith("# siimcovid fuse's record") and "&" not in text and "*" not in text  # plain YAML
    record = FUSION_RECORD.read(folder / NAME)
    test = record["test"]
    assert record["format"] == 1 and "oof" not in record and "tune" not in record and test["split"] == "test"
    assert [f["models"] for f in test["det"]] == [["v5b"], ["v5a"]] and test["cls"][0]["models"] == ["b3"]
    for item in test["det"] + test["cls"]:
        assert item["sha256"] == hashlib.sha256(Path(item["file"]).read_bytes()).hexdigest()
    assert test["params"]["det_weights"] == [2.0, 1.0] and test["params"]["iou_thr"] == 0.5 and test["data"] == str(prepared)
    saved = yaml.safe_load((folder / "fuse_test.yaml").read_text())  # the settings file beside it says the same
    assert all(test["params"][k] == saved[k] for k in test["params"])
    # an oof fusion into the same folder adds its entry and keeps the test one
    oof = {"det": [str(project / "detect/v5a/pred_oof.csv")], "cls": [], "folds": [0, 1]}
    call("fuse", split="oof", data=str(prepared), project=str(project / "fuse"), name="ens", workers=1, **oof)
    again = FUSION_RECORD.read(folder / NAME)
    assert again["test"] == test and again["oof"]["folds"] == [0, 1] and again["oof"]["det"][0]["models"] == ["v5a"]
    listed = yaml.safe_load((folder / "fuse_files.yaml").read_text())["files"]
    assert NAME in listed  # the outputs rule: fuse's own file, replaced or removed only by fuse


def test_a_fusion_killed_before_its_last_file_leaves_no_entry_that_export_would_trust(runs, prepared, tmp_path, monkeypatch):
    from siimcovid.config import Config

    project = copy_runs(runs, tmp_path)
    folder = fuse_test(project, prepared, "x", ["x"], ["x"])
    monkeypatch.setattr(Config, "save", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt()))  # killed
    with pytest.raises(KeyboardInterrupt):
        fuse_test(project, prepared, "x", ["x"], ["x"], iou_thr=0.4)  # new tables written, its settings not yet
    monkeypatch.undo()
    assert (folder / "submission.csv").is_file() and not (folder / NAME).exists()
    with pytest.raises(SiimError, match=r"has no fusion.yaml.*run `siimcovid fuse cfg=.*fuse_test.yaml project="):
        export_of(project, folder, tmp_path / "b")


def test_an_earlier_fuse_folder_is_one_error_naming_the_command_that_records_it(runs, prepared, tmp_path):
    project = copy_runs(runs, tmp_path)
    folder = fuse_test(project, prepared, "x", ["x"], ["x"], iou_thr=0.55)
    (folder / NAME).unlink()  # as the release before the record left it: fuse_test.yaml and the tables
    with pytest.raises(SiimError) as error:
        export_of(project, folder, tmp_path / "b")
    message = str(error.value)
    assert "\n" not in message and f"{folder} has no fusion.yaml" in message and "earlier siimcovid" in message
    command = message.split("`")[1].split()
    assert command[:2] == ["siimcovid", "fuse"]
    call("fuse", **dict(arg.split("=", 1) for arg in command[2:]))  # what the message says to run
    fusion = yaml.safe_load((export_of(project, folder, tmp_path / "b") / "fuse.yaml").read_text())
    assert fusion["iou_thr"] == 0.55 and fusion["det"] == ["x"] and fusion["cls"] == ["x"]
    (folder / "fuse_test.yaml").rename(folder / "mine.yaml")
    (folder / NAME).unlink()
    with pytest.raises(SiimError, match="is not a fuse run folder"):
        export_of(project, folder, tmp_path / "c")
    with pytest.raises(SiimError, match=r"mine.yaml lists det/cls files but is not a record of what fuse fused"):
        export_of(project, folder / "mine.yaml", tmp_path / "c")  # a fuse config names files, not what they held


def test_export_refuses_a_prediction_file_changed_since_it_was_fused(runs, prepared, tmp_path, caplog):
    project = copy_runs(runs, tmp_path)
    folder = fuse_test(project, prepared, "x", ["x"], ["x"])
    table = project / "detect/x/pred_test.csv"
    kept = table.read_bytes()
    fake_predictions(project / "detect/x", prepared, "detect", seed=99)  # predicted again, with other boxes
    with pytest.raises(SiimError, match=rf"export: {table} changed since {folder / NAME} fused it.*fuse them again"):
        export_of(project, folder, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    table.write_bytes(kept)
    table.unlink()  # gone: the record still says which model it held
    out = export_of(project, folder, tmp_path / "b")
    assert "pred_test.csv, which" in caplog.text and "is gone: its models ['x'] as recorded" in caplog.text
    assert yaml.safe_load((out / "fuse.yaml").read_text())["det"] == ["x"]


def test_export_refuses_another_run_of_the_name_the_fusion_fused(runs, prepared, tmp_path):
    project = copy_runs(runs, tmp_path)
    folder = fuse_test(project, prepared, "x", ["x"], ["x"])
    other = tmp_path / "elsewhere"
    shutil.copytree(project / "classify/x", other / "classify/x")  # another run of the same name...
    fake_predictions(other / "classify/x", prepared, "classify", seed=99)  # ...whose own predictions are other ones
    refused = r"elsewhere/classify/x is not the run .*fusion.yaml fused as 'x': its pred_test_image.csv"
    with pytest.raises(SiimError, match=refused):
        export(project, detect=[str(project / "detect/x")], classify=[str(other / "classify/x")], fuse=str(folder),
               out=str(tmp_path / "b"))  # fmt: skip
    assert not (tmp_path / "b").exists()
    assert export_of(project, folder, tmp_path / "b").is_dir()  # the run fused: exported


def test_a_record_edited_by_hand_is_refused_naming_the_key(runs, prepared, tmp_path):
    project = copy_runs(runs, tmp_path)
    folder = fuse_test(project, prepared, "x", ["x"], ["x"])
    data = yaml.safe_load((folder / NAME).read_text())
    data["test"]["params"]["iou_thr"] = "a lot"
    (folder / NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(SiimError, match=rf"export: {folder / NAME}: test: params: fuse setting iou_thr='a lot'"):
        export_of(project, folder, tmp_path / "b")
    data["test"]["params"]["iou_thr"] = 0.5
    data["test"]["det"][0]["sha256"] = "not a digest"
    (folder / NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(SiimError, match=r"test: det: .* is not \{file: <path>, sha256: <64 hex digits>"):
        export_of(project, folder, tmp_path / "b")


# ----------------------------------------------------------------------------- one declaration, writer and reader
def test_a_declared_file_is_checked_when_written_as_when_read(tmp_path):
    from siimcovid.bundle.files import FUSION_FILE, MANIFEST_FILE, PREPARE_FILE
    from siimcovid.bundle.members import KINDS

    with pytest.raises(SiimError, match=r"prepare.yaml \(not written\): prepare setting ext='bmp'"):
        PREPARE_FILE.write({"sizes": [64], "ext": "bmp", "png_level": 0}, tmp_path / "prepare.yaml")
    with pytest.raises(SiimError, match=r"unknown key\(s\) \['n_folds'\]"):
        PREPARE_FILE.write({"sizes": [64], "ext": "png", "png_level": 0, "n_folds": 5}, tmp_path / "prepare.yaml")
    assert not (tmp_path / "prepare.yaml").exists()
    path = PREPARE_FILE.write({"sizes": [64, 128], "ext": "png", "png_level": 1}, tmp_path / "prepare.yaml")
    assert PREPARE_FILE.read(path) == {"sizes": [64, 128], "ext": "png", "png_level": 1}
    with pytest.raises(SiimError, match=r"fuse.yaml \(not written\): det: \['a', 'a'\] is not a list of distinct"):
        FUSION_FILE.write({"det": ["a", "a"], "cls": []}, tmp_path / "fuse.yaml")
    # each format's documentation is its declaration: every key, with its meaning
    for doc in (MANIFEST_FILE, PREPARE_FILE, FUSION_FILE, FUSION_RECORD, *(k.settings for k in KINDS.values())):
        text = doc.describe()
        assert text.startswith(doc.files) and all(f"    {k.name} " in text for k in doc.keys)


def test_predict_prepares_with_the_keys_the_bundle_declares(runs, tmp_path):
    from siimcovid.bundle import open_bundle
    from siimcovid.bundle.files import PREPARE_FILE
    from siimcovid.predict.source import prepare_settings

    bundle = open_bundle(export(runs, pipeline="x", out=str(tmp_path / "b")))
    settings = prepare_settings(bundle.prepare, tmp_path / "src", "folder", tmp_path / "out", None, "skip")
    assert {k: settings[k] for k in PREPARE_FILE.names} == PREPARE_FILE.read(tmp_path / "b" / "prepare.yaml")

"""`siimcovid predict`: a bundle's models on new data (siimcovid/predict/).

Fast tests: what the source is, the sample submission written from prepared images, the
settings, the record that decides what a re-run reuses. Slow tests (a tiny trained run, exported
with `siimcovid export`): the submission on the run's SIIM root equals the run's own byte for byte,
a corrupt bundle stops before any work, a loose folder of DICOMs, a resumed re-run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from siimcovid.config import ConfigError
from siimcovid.data.siim import read_sample_submission
from siimcovid.predict.members import Hardware, detector_config, member_tta
from siimcovid.predict.record import RECORD, Record, images_id
from siimcovid.predict.source import loader_workers, pool_workers, prepare_settings, sample_from_meta, source_layout
from siimcovid.stages import stage_config
from siimcovid.tables import SAMPLE, SAMPLE_SUBMISSION
from siimcovid.utils import SiimError


# ----------------------------------------------------------------------------- fast
def test_a_siim_root_is_told_from_a_folder_of_dicoms_and_from_one_file(tmp_path):
    root = tmp_path / "siim"
    (root / "test").mkdir(parents=True)
    (root / SAMPLE_SUBMISSION).write_text("id,PredictionString\n")
    assert source_layout(root) == "siim"
    (root / SAMPLE_SUBMISSION).unlink()  # a test/ folder alone is just a tree of DICOMs
    assert source_layout(root) == "folder"
    one = tmp_path / "x.dcm"
    one.write_bytes(b"")
    assert source_layout(one) == "folder"
    with pytest.raises(SiimError, match="source not found"):
        source_layout(tmp_path / "missing")


def test_a_siim_root_without_its_sample_submission_is_refused_not_predicted_as_a_folder(tmp_path):
    """Else its train images would be predicted beside the test ones, and no submission written, with exit 0."""
    root = tmp_path / "siim"
    (root / "test").mkdir(parents=True)
    (root / "train_image_level.csv").write_text("id,boxes,label,StudyInstanceUID\n")
    with pytest.raises(SiimError, match=r"looks like a SIIM root .* has no readable sample_submission.csv.*source=.*test"):
        source_layout(root)
    (root / SAMPLE_SUBMISSION).mkdir()  # not a file either
    with pytest.raises(SiimError, match="looks like a SIIM root"):
        source_layout(root)


def test_the_sample_of_a_folder_source_lists_every_prepared_study_then_every_image(tmp_path):
    test = pd.DataFrame({"image_id": ["i1", "i2", "i3"], "study_id": ["s2", "s1", "s2"]})
    path = SAMPLE.write(sample_from_meta(test), tmp_path / SAMPLE_SUBMISSION)
    studies, images = read_sample_submission(path)  # the parser fuse reads it with
    assert studies == ["s2", "s1"] and images == ["i1", "i2", "i3"]


def test_prepare_takes_the_bundles_conversion_settings_and_only_the_test_split(tmp_path):
    conversion = {"sizes": [64, 128], "ext": "jpg", "png_level": 0, "n_folds": 5}
    settings = prepare_settings(conversion, tmp_path / "src", "siim", tmp_path / "out" / "prepared", None, "skip")
    cfg = stage_config("prepare", None, settings)  # typed and checked as on the command line
    assert (cfg.sizes, cfg.ext, cfg.splits, cfg.layout, cfg.on_error) == ([64, 128], "jpg", ["test"], "siim", "skip")
    assert cfg.workers is None and "n_folds" not in settings  # every core; folds mean nothing for test images
    with pytest.raises(SiimError, match=r"lack \['ext'\]"):
        prepare_settings({"sizes": [64], "png_level": 0}, tmp_path, "siim", tmp_path / "p", None, "skip")


def test_workers_map_to_pools_and_loaders():
    assert (pool_workers(None), pool_workers(0), pool_workers(3)) == (None, 0, 3)  # one meaning: null = every core
    assert loader_workers(0) == 0 and loader_workers(2) == 2 and 1 <= loader_workers(None) <= 8


def test_predict_settings_are_typed_and_registered():
    cfg = stage_config("predict", None, {"bundle": "b", "source": "s", "out": "o", "tta": "false", "batch": 4})
    assert cfg.tta is False and cfg.batch == 4 and cfg.half is True and cfg.on_error == "skip" and cfg.device is None
    with pytest.raises(ConfigError, match="predict setting batch=0"):
        stage_config("predict", None, {"batch": 0})
    with pytest.raises(ConfigError, match="unknown predict setting 'bundles'"):
        stage_config("predict", None, {"bundles": "b"})


def test_predict_needs_a_bundle_a_source_and_an_out():
    from siimcovid.cli import call

    with pytest.raises(SiimError, match="predict needs bundle="):
        call("predict", source="s", out="o")


def test_a_source_file_that_is_no_image_is_one_line_and_leaves_no_out(tmp_path):
    from siimcovid.cli import call

    (tmp_path / "notes.csv").write_text("id,x\n1,2\n")
    with pytest.raises(SiimError, match=r"source=.*notes.csv is not an image to predict: neither a DICOM nor a PNG/JPEG"):
        call("predict", bundle=str(tmp_path / "no-bundle"), source=str(tmp_path / "notes.csv"), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_an_out_inside_a_folder_source_is_refused_before_anything(tmp_path):
    from siimcovid.cli import call

    (tmp_path / "dicoms").mkdir()
    with pytest.raises(SiimError, match="lies inside source="):
        call("predict", bundle=str(tmp_path / "no-bundle"), source=str(tmp_path / "dicoms"), out=str(tmp_path / "dicoms/out"))
    assert not (tmp_path / "dicoms" / "out").exists()


def test_tta_null_keeps_each_members_own_and_a_value_sets_every_member():
    det = SimpleNamespace(kind="detect", name="d", settings={"tta": True})
    cls = SimpleNamespace(kind="classify", name="c", settings={"tta": "d4"})
    assert member_tta(det, None) is True and member_tta(cls, None) == "d4"
    assert member_tta(det, False) is False and member_tta(cls, False) == "none" and member_tta(cls, True) == "hflip"
    assert member_tta(det, "none") is False and member_tta(det, "vflip") is True and member_tta(cls, "vflip") == "vflip"
    assert member_tta(SimpleNamespace(kind="classify", name="c", settings={"tta": False}), None) == "none"  # an old bundle


def test_a_detector_members_settings_reach_ultralytics_as_its_run_gave_them():
    import torch

    from siimcovid.detect.predict import predict_args

    settings = {"conf": 0.01, "iou": 0.4, "max_det": 50, "predict_imgsz": None, "tta": True}
    settings["ultralytics"] = {"agnostic_nms": True}
    member = SimpleNamespace(kind="detect", name="v5", settings=settings)
    args = predict_args(detector_config(member, Hardware(torch.device("cpu"), 4, 0, True), member_tta(member, False)))
    assert (args["conf"], args["iou"], args["max_det"], args["augment"]) == (0.01, 0.4, 50, False)
    assert (args["batch"], args["device"], args["agnostic_nms"], args["quantize"]) == (4, "cpu", True, 16)


def test_the_record_reuses_a_table_only_for_the_same_bundle_images_and_tta(tmp_path):
    table = tmp_path / "detect" / "a" / "pred_test.csv"
    table.parent.mkdir(parents=True)
    entry = {"images": images_id(["i1", "i2"]), "tta": False, "half": False}
    record = Record(tmp_path, "b1", "sha-1", {})
    record.claim(table)  # as predict does before it writes a table: predict.yaml lists it
    table.write_text("x")
    assert not record.reusable("detect/a", entry, table)
    record.done("detect/a", entry)
    again = Record(tmp_path, "b1", "sha-1", {})  # a re-run reads predict.yaml
    assert again.reusable("detect/a", entry, table)
    assert not again.reusable("detect/a", {**entry, "tta": True}, table)
    assert not again.reusable("detect/a", {**entry, "images": images_id(["i1"])}, table)
    other = Record(tmp_path, "b2", "sha-2", {})  # another bundle: its tables go
    assert not table.exists() and not other.reusable("detect/a", entry, table)
    assert (tmp_path / RECORD).is_file()


# ----------------------------------------------------------------------------- slow: a tiny run, exported
@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny run (conftest.tiny_run), exported: (base folder, SIIM root, the run's submission, the bundle)."""
    base, result = tiny_run
    return base, base / "siim", result["submission"], result["bundle"]


def predict(bundle, source, out, **settings):
    from siimcovid.cli import call

    return call("predict", bundle=str(bundle), source=str(source), out=str(out), workers=0, **settings)


@pytest.fixture(scope="module")
def on_siim(trained):
    """predict on the run's SIIM root (the test folder and its sample submission)."""
    base, root, _, bundle = trained
    return predict(bundle, root, base / "out-siim")


@pytest.mark.slow
def test_on_a_siim_root_the_submission_is_the_runs_own_byte_for_byte(trained, on_siim):
    _, root, run_submission, _ = trained
    assert on_siim["submission"].read_bytes() == run_submission.read_bytes()
    assert (on_siim["out"] / "fuse" / "submission.csv").read_bytes() == run_submission.read_bytes()
    assert on_siim["skipped"] is None and on_siim["n_images"] == len(read_sample_submission(root / SAMPLE_SUBMISSION)[1])
    assert set(on_siim["seconds"]) == {"prepare", "detect/e2e", "classify/e2e", "fuse", "view"}


@pytest.mark.slow
def test_a_corrupt_bundle_stops_before_any_work(trained, tmp_path):
    import shutil

    _, root, _, bundle = trained
    broken = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    checkpoint = next((broken / "classify").glob("*/fold0.safetensors"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:-10])
    with pytest.raises(SiimError, match="fold0.safetensors"):
        predict(broken, root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing prepared, nothing created


@pytest.mark.slow
def test_a_folder_with_no_image_is_an_error_that_leaves_no_out(trained, tmp_path):
    _, _, _, bundle = trained
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no image here")
    with pytest.raises(SiimError):
        predict(bundle, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_unreadable_test_dicom_still_gives_a_complete_submission(trained, on_siim, tmp_path):
    import shutil

    from siimcovid.predict.stage import UNREAD_IMAGE, UNREAD_STUDY
    from siimcovid.submission import read_submission

    _, root, _, bundle = trained
    copy = Path(shutil.copytree(root, tmp_path / "siim"))
    broken = sorted((copy / "test").rglob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:200])  # cut inside the header: not a readable DICOM
    result = predict(bundle, copy, tmp_path / "out")
    sub = read_submission(result["submission"], sample=copy / SAMPLE_SUBMISSION)  # every id, as Kaggle checks
    rows = dict(zip(sub.id, sub.PredictionString))
    assert rows[f"{broken.stem}_image"] == UNREAD_IMAGE
    study = f"{broken.parent.parent.name}_study"
    alone = len(list(broken.parent.parent.rglob("*.dcm"))) == 1
    assert (rows[study] == UNREAD_STUDY) == alone  # a study keeps its fused row while it has a readable image
    full = dict(zip(*read_submission(on_siim["submission"]).T.to_numpy()))
    assert all(rows[i] == full[i] for i in rows if i not in (f"{broken.stem}_image", study))  # the others: as before


@pytest.mark.slow
def test_a_loose_folder_is_grouped_by_study_and_lists_what_is_not_a_dicom(trained, on_siim, tmp_path):
    import random
    import shutil

    import pydicom

    _, root, _, bundle = trained
    loose = tmp_path / "loose"
    (loose / "deeper").mkdir(parents=True)
    dicoms = sorted((root / "test").rglob("*.dcm"))
    rng = random.Random(0)
    for k, f in enumerate(dicoms):  # random names, no extension, two folders: nothing but the tags says the study
        shutil.copy(f, loose / ("deeper" if k % 2 else "") / f"{rng.getrandbits(40):x}")
    (loose / "notes.txt").write_text("not an image\n")
    result = predict(bundle, loose, tmp_path / "out")
    assert result["submission"] is None and result["n_images"] == len(dicoms)
    skipped = pd.read_csv(result["skipped"])
    assert list(skipped.file) == [str(loose / "notes.txt")]
    # the SIIM root names a study by its folder (test/<study>/<series>/<image>.dcm); a loose file has only its tags
    tag_to_folder = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID): f.parent.parent.name for f in dicoms}
    studies = pd.read_csv(result["out"] / "fuse" / "studies_test.csv")
    studies = studies.assign(study_id=studies.study_id.map(tag_to_folder)).set_index("study_id").sort_index()
    expected = pd.read_csv(on_siim["out"] / "fuse" / "studies_test.csv").set_index("study_id").sort_index()
    assert list(studies.index) == list(expected.index)  # the SIIM root's studies, grouped from the tags alone
    pd.testing.assert_frame_equal(studies, expected, atol=1e-6)  # the same models on the same pixels

    one = predict(bundle, dicoms[0], tmp_path / "one")  # a single DICOM file
    assert one["n_images"] == 1 and one["skipped"] is None
    assert len(pd.read_csv(one["out"] / "fuse" / "studies_test.csv")) == 1


@pytest.mark.slow
def test_a_rerun_resumes_without_predicting_again(trained, tmp_path, monkeypatch):
    from siimcovid.classify import predict as classify_predict
    from siimcovid.detect import predict as detect_predict

    _, root, run_submission, bundle = trained
    out = tmp_path / "out"
    first = predict(bundle, root, out)
    tables = [out / "detect" / "e2e" / "pred_test.csv", out / "classify" / "e2e" / "pred_test_image.csv"]
    stamps = [t.stat().st_mtime_ns for t in tables]

    def refuse(*args, **kwargs):
        raise AssertionError("predicted again")

    monkeypatch.setattr(detect_predict, "predict_run", refuse)
    monkeypatch.setattr(classify_predict, "predict_test", refuse)
    again = predict(bundle, root, out)
    assert [t.stat().st_mtime_ns for t in tables] == stamps
    assert again["submission"].read_bytes() == first["submission"].read_bytes() == run_submission.read_bytes()
    with pytest.raises(AssertionError, match="predicted again"):  # another TTA: not the table the record vouches for
        predict(bundle, root, out, tta=True)

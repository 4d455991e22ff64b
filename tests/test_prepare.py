"""`siimcovid prepare` outputs, resume, and the data YAML training with plain Ultralytics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from siimcovid.config import load_config
from siimcovid.data import convert
from siimcovid.data.boxes import from_yolo
from siimcovid.data.prepare import prepare
from siimcovid.data.prepared import Prepared
from siimcovid.data.siim import IMAGE_CSV, SAMPLE_SUBMISSION, read_sample_submission
from siimcovid.tables import META
from siimcovid.utils import SiimError


def test_outputs_match_the_meta_table(prepared, synth_root):
    p = Prepared(prepared)
    meta = p.meta
    assert list(meta.columns) == META.names
    train, test = p.split("train"), p.split("test")
    assert len(train) == len(pd.read_csv(synth_root / IMAGE_CSV))
    studies, images = read_sample_submission(synth_root / SAMPLE_SUBMISSION)
    assert set(test.image_id) == set(images) and set(test.study_id) == set(studies)
    assert (test.fold == -1).all() and (test.rows > 0).all()
    assert set(train.fold) == {0, 1, 2}
    for size in (64, 128):
        for r in meta.itertuples():
            img = cv2.imread(str(p.image_path(r.image_id, r.split, size)), cv2.IMREAD_UNCHANGED)
            assert img.shape == (size, size) and img.dtype == np.uint8
    for r in train.itertuples():
        lines = p.label_path(r.image_id, 128).read_text().split("\n")[:-1]
        assert len(lines) == r.n_boxes
        if r.n_boxes:
            yolo = np.array([[float(v) for v in line.split()[1:]] for line in lines])
            np.testing.assert_allclose(from_yolo(yolo, r.cols, r.rows), r.boxes, atol=0.02)
        mask = cv2.imread(str(p.mask_path(r.image_id, 64)), cv2.IMREAD_GRAYSCALE)
        assert mask.shape == (64, 64) and (mask.max() == 255) == (r.n_boxes > 0)


def test_saved_settings_seed_the_next_prepare(prepared):
    from siimcovid.config import load_config

    cfg = load_config("prepare", {"cfg": str(prepared / "prepare.yaml"), "name": "again"})
    saved = Prepared.read_cfg(prepared)
    assert cfg.sizes == saved["sizes"] and cfg.n_folds == saved["n_folds"] and cfg.name == "again"
    assert "data_resolved" in saved and "data_resolved" not in cfg  # recorded, not a setting


def test_opacities_are_brighter_inside_boxes(prepared):
    # The synthetic opacities are drawn at the labelled boxes: the prepared images show them.
    p = Prepared(prepared)
    inside, outside = [], []
    for r in p.split("train").itertuples():
        if not r.n_boxes:
            continue
        img = cv2.imread(str(p.image_path(r.image_id, "train", 128)), cv2.IMREAD_GRAYSCALE).astype(float)
        mask = cv2.imread(str(p.mask_path(r.image_id, 128)), cv2.IMREAD_GRAYSCALE) > 0
        inside.append(img[mask].mean())
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask
        outside.append(img[ring].mean())
    assert np.mean(np.array(inside) > np.array(outside)) > 0.8


def test_data_yaml_lists_follow_the_folds(prepared):
    p = Prepared(prepared)
    data = yaml.safe_load((prepared.parent / "data_yaml" / "tiny_fold1.yaml").read_text())
    root = Path(data["path"])
    assert root == (prepared / "128").resolve() and data["names"] == {0: "opacity"}
    val = [Path(x).stem for x in (root / data["val"]).read_text().split()]
    fit = [Path(x).stem for x in (root / data["train"]).read_text().split()]
    assert set(val) == set(p.fold(1, "val").image_id) and set(fit) == set(p.fold(1, "train").image_id)
    assert all((root / x).exists() for x in (root / data["val"]).read_text().split())


def _cfg(root, out, **kw):
    return load_config(
        "prepare",
        {
            "data": str(root),
            "out": str(out),
            "sizes": [64],
            "n_folds": 2,
            "workers": 1,
            "data_yaml_dir": str(Path(out).parent / "data_yaml"),
            **kw,
        },
    )


def test_rerun_skips_decoding_and_resumes_an_interrupted_run(tiny_root, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare(_cfg(tiny_root, out))
    calls = []
    real = convert.dicom_to_uint8
    monkeypatch.setattr(convert, "dicom_to_uint8", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    prepare(_cfg(tiny_root, out))
    assert calls == []  # finished: nothing decoded again
    # Simulate an interruption: meta.csv never written, two images missing.
    (out / "meta.csv").unlink()
    gone = sorted((out / "64" / "images" / "train").glob("*.png"))[:2]
    for g in gone:
        g.unlink()
    prepare(_cfg(tiny_root, out))
    assert sorted(Path(c).stem for c in calls) == sorted(g.stem for g in gone)
    assert (out / "meta.csv").exists() and all(g.exists() for g in gone)
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_resume_decodes_again_an_image_that_is_not_whole(tiny_root, tmp_path, monkeypatch, ext):
    # a file that merely exists is not a finished image: 0 bytes, cut short, or another size are decoded again
    out = tmp_path / "out"
    prepare(_cfg(tiny_root, out, ext=ext))
    images = sorted((out / "64" / "images").rglob(f"*.{ext}"))
    before = {p: p.read_bytes() for p in images}
    empty, cut, small, damaged_end = images[0], images[3], images[5], images[-1]
    empty.write_bytes(b"")
    cut.write_bytes(before[cut][: len(before[cut]) // 2])
    cv2.imwrite(str(small), np.zeros((32, 32), np.uint8))  # whole, but 32 px in the 64 px folder
    damaged_end.write_bytes(before[damaged_end][:-1])
    (out / "meta.csv").unlink()
    calls = []
    real = convert.dicom_to_uint8
    monkeypatch.setattr(convert, "dicom_to_uint8", lambda *a, **k: calls.append(Path(a[0]).stem) or real(*a, **k))
    prepare(_cfg(tiny_root, out, ext=ext))
    assert sorted(calls) == sorted(p.stem for p in (empty, cut, small, damaged_end))
    assert all(p.read_bytes() == data for p, data in before.items())
    assert all(convert.image_is_whole(p, 64, ext) for p in images)


def test_a_rerun_that_fails_leaves_the_folder_unfinished(tiny_root, tmp_path):
    # new settings + a DICOM gone bad: the old meta table must not stay beside the new settings
    from siimcovid.data.siim import find_dicoms

    out = tmp_path / "out"
    prepare(_cfg(tiny_root, out))
    old = Prepared(out)
    Path(find_dicoms(tiny_root / "train").path.iloc[0]).write_bytes(b"not a dicom")
    with pytest.raises(SiimError, match="not a dicom|DICOM|read"):
        prepare(_cfg(tiny_root, out, sizes=[32, 64], n_folds=3))
    assert not (out / "meta.csv").exists()
    with pytest.raises(SiimError, match="not a finished prepared dataset"):
        Prepared(out)
    prepare(_cfg(tiny_root, out, sizes=[32, 64], n_folds=3, on_error="skip"))  # finishing it
    assert Prepared(out).sizes == [32, 64] and Prepared(out).n_folds == 3 and old.n_folds != 3
    assert not (out / "meta.previous.csv").exists()


def path_of(job):
    return job["path"]


def die_on_the_third(job):
    if job["path"] == "3.dcm":
        os._exit(1)  # what the kernel's out-of-memory killer does to a worker
    return job["path"]


def test_a_worker_that_dies_is_an_error_not_a_hang():
    from siimcovid.data.prepare import run_jobs

    jobs = [{"path": f"{i}.dcm"} for i in range(6)]
    assert sorted(run_jobs(jobs, 2, "ok", convert=path_of)) == sorted(j["path"] for j in jobs)
    with pytest.raises(SiimError, match=r"a prepare worker died .* e\.g\. \d\.dcm"):
        list(run_jobs(jobs, 2, "dies", convert=die_on_the_third))


def test_exclude_none_from_detector_training(tiny_root, tmp_path):
    out = prepare(_cfg(tiny_root, tmp_path / "out", yolo_exclude_none=True))
    meta = Prepared(out).split("train")
    fit = [Path(x).stem for x in (out / "64" / "fold0_train.txt").read_text().split()]
    val = [Path(x).stem for x in (out / "64" / "fold0_val.txt").read_text().split()]
    assert set(fit) == set(meta[(meta.fold != 0) & (meta.n_boxes > 0)].image_id)
    assert set(val) == set(meta[meta.fold == 0].image_id)  # validation keeps none images


def test_refuses_to_mix_two_datasets_in_one_folder(tiny_root, tmp_path):
    out = tmp_path / "out"
    prepare(_cfg(tiny_root, out))
    other = Path(shutil.copytree(tiny_root, tmp_path / "other"))
    with pytest.raises(SiimError, match="already holds data prepared from"):
        prepare(_cfg(other, out))


def test_parallel_workers_give_the_same_images(tiny_root, tmp_path):
    one = prepare(_cfg(tiny_root, tmp_path / "one", ext="jpg"))
    two = prepare(_cfg(tiny_root, tmp_path / "two", ext="jpg", workers=2))
    a = sorted((one / "64" / "images").rglob("*.jpg"))
    b = sorted((two / "64" / "images").rglob("*.jpg"))
    assert [x.name for x in a] == [x.name for x in b] and len(a) > 5
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    pd.testing.assert_frame_equal(pd.read_csv(one / "meta.csv"), pd.read_csv(two / "meta.csv"))


@pytest.mark.slow
def test_generated_data_yaml_trains_with_plain_ultralytics(prepared, tmp_path):
    yolo = Path(sys.executable).with_name("yolo")
    data = prepared.parent / "data_yaml" / "tiny_fold0.yaml"
    cmd = [
        str(yolo),
        "detect",
        "train",
        f"data={data}",
        "model=yolov5n.yaml",
        "pretrained=False",
        "epochs=1",
        "imgsz=64",
        "batch=8",
        "device=cpu",
        "workers=0",
        "plots=False",
        f"project={tmp_path}",
        "name=run",
    ]
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path / "cfg")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "run" / "weights" / "last.pt").exists()
    results = pd.read_csv(tmp_path / "run" / "results.csv")
    assert len(results) == 1


def test_png_level_trades_size_for_speed_not_pixels(tiny_root, tmp_path):
    stored = prepare(_cfg(tiny_root, tmp_path / "stored"))
    packed = prepare(_cfg(tiny_root, tmp_path / "packed", png_level=1))
    a = sorted((stored / "64" / "images").rglob("*.png"))
    b = sorted((packed / "64" / "images").rglob("*.png"))
    assert [x.name for x in a] == [x.name for x in b]
    assert sum(x.stat().st_size for x in b) < 0.8 * sum(x.stat().st_size for x in a)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(cv2.imread(str(x), cv2.IMREAD_UNCHANGED), cv2.imread(str(y), cv2.IMREAD_UNCHANGED))
    with pytest.raises(SiimError, match="png_level"):
        prepare(_cfg(tiny_root, tmp_path / "bad", png_level=12))


def _no_dicom_read(*args, **kwargs):
    raise AssertionError(f"a DICOM was read before the settings were checked: {args[0]}")


@pytest.mark.parametrize(
    "setting, message",
    [
        ("n_folds=1", r"prepare setting n_folds=1: expected int >= 2"),
        ("n_folds=0", r"prepare setting n_folds=0: expected int >= 2"),
        ("n_folds=-1", r"prepare setting n_folds=-1: expected int >= 2"),
        ("n_folds=8", r"n_folds=8 is too many for \d+ images .*lower n_folds"),  # too many for the strata of 10 studies
        ("n_folds=40", r"only \d+ patients for 40 folds: lower n_folds"),
        ("yolo_size=32", r"yolo_size 32 is not one of sizes \[64\]"),
        ("splits=[]", r"splits= is empty"),
    ],
)
def test_settings_fail_before_any_dicom_is_read(tiny_root, tmp_path, monkeypatch, setting, message):
    # a bad setting must not cost a pass over the DICOMs first (most of an hour on the real data)
    from siimcovid import cli

    monkeypatch.setattr(convert, "dicom_to_uint8", _no_dicom_read)
    monkeypatch.setattr(convert, "read_header", _no_dicom_read)  # the resume path reads headers: none either
    args = ["prepare", f"data={tiny_root}", f"out={tmp_path / 'out'}", "sizes=[64]", "n_folds=2", "workers=1"]
    args.append(f"data_yaml_dir={tmp_path}/y")
    with pytest.raises(SiimError, match=message):
        cli.main([*args, setting])
    assert not (tmp_path / "out").exists()
    with pytest.raises(AssertionError, match="a DICOM was read"):  # with good values it gets past the checks to the DICOMs
        cli.main(args)


def test_a_changed_fold_assignment_is_reported_from_the_previous_meta_table(prepared, tmp_path, caplog):
    from siimcovid.data.prepare import warn_if_folds_changed

    meta = Prepared(prepared).meta
    previous = META.write(meta, tmp_path / "meta.previous.csv")
    warn_if_folds_changed(previous, meta)
    assert "fold assignment" not in caplog.text
    train = meta.split == "train"
    warn_if_folds_changed(previous, meta.assign(fold=np.where(train, (meta.fold + 1) % meta.fold[train].max(), -1)))
    assert f"the fold assignment of {tmp_path} changed" in caplog.text
    previous.write_text(previous.read_text().replace("train,", "train,x", 1))  # fold 'x0': unreadable
    warn_if_folds_changed(previous, meta)
    assert "cannot compare the folds with the previous meta table" in caplog.text and "line 2" in caplog.text


def test_a_folder_an_earlier_prepare_wrote_still_reads(prepared, tmp_path):
    """meta.csv of a prepare from before the DICOM tags were recorded has no body_part / view_position: every later
    stage (fuse, evaluate, classify) reads it through Prepared, which gives those columns as '' (unknown)."""
    old = Path(shutil.copytree(prepared, tmp_path / "old"))
    meta = pd.read_csv(old / "meta.csv", dtype=str, keep_default_na=False).drop(columns=["body_part", "view_position"])
    meta.to_csv(old / "meta.csv", index=False)
    read = Prepared(old).meta
    assert (read.body_part == "").all() and (read.view_position == "").all() and len(read) == len(Prepared(prepared).meta)

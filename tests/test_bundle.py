"""`siimcovid export` and `open_bundle`: the bundle's layout, manifest and checks.

Fast tests export hand-built run folders that hold small real checkpoints (a yolov5n model saved the
way Ultralytics leaves a finished fold, timm's test_efficientnet in a classify best.pt); the slow
test exports what a tiny `siimcovid run` trained, as `run` itself does at its end.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml

from siimcovid.bundle import MANIFEST, open_bundle
from siimcovid.cli import call
from siimcovid.utils import SiimError

CLS_MODEL = {"model": "test_efficientnet", "in_chans": 3, "drop_rate": 0.0, "drop_path_rate": 0.0}
CLS_MODEL.update(mask_stride=16, none_head=True)
FOLDS = (0, 1)  # trained folds of every fake run (the prepared data has 3: a run may pack some of them)


def yaml_file(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fake_detect_run(run_dir: Path, prepared: Path, checkpoint: Path) -> Path:
    """A detect run as `detect train` leaves it: detect.yaml, fold<k>/args.yaml, weights/{best,last}.pt (finished)."""
    from siimcovid.data.prepared import Prepared

    yaml_file(run_dir / "detect.yaml", {"prepared": str(prepared), "size": 64, "folds_id": Prepared(prepared).folds_id})
    for k in FOLDS:
        yaml_file(run_dir / f"fold{k}" / "args.yaml", {"imgsz": 64})
        (run_dir / f"fold{k}" / "weights").mkdir()
        for name in ("best.pt", "last.pt"):
            (run_dir / f"fold{k}" / "weights" / name).hardlink_to(checkpoint)
    return run_dir


def fake_classify_run(run_dir: Path, prepared: Path) -> Path:
    """A classify run as `classify train` leaves it: classify.yaml, fold<k>/best.pt and done.json."""
    import torch

    from siimcovid.classify.model import build_model
    from siimcovid.data.prepared import Prepared

    folds_id = Prepared(prepared).folds_id
    yaml_file(run_dir / "classify.yaml", {"data": str(prepared), "imgsz": 64, "folds_id": folds_id, **CLS_MODEL})
    for k in FOLDS:
        torch.manual_seed(k)
        state = build_model(CLS_MODEL).state_dict()
        best = {"model": state, "model_cfg": CLS_MODEL, "epoch": 1, "ema": 0.997, "fold": k, "folds_id": folds_id}
        (run_dir / f"fold{k}").mkdir(parents=True)
        torch.save(best, run_dir / f"fold{k}" / "best.pt")
        (run_dir / f"fold{k}" / "done.json").write_text(json.dumps({"fold": k}))
    return run_dir


def fake_predictions(run_dir: Path, prepared: Path, kind: str, seed: int) -> Path:
    """The prediction tables a run's predict writes (detect: pred_{oof,test}.csv; classify: pred_{oof,test}_image.csv),
    made up but of their contracts: out of fold each train image by its own fold's model, on test every fold's."""
    import numpy as np
    import pandas as pd

    from siimcovid.data.prepared import Prepared
    from siimcovid.tables import CLASSIFIER_IMAGES, DETECTIONS, STUDY_CLASSES

    rng = np.random.default_rng(seed)
    for split, part in (("oof", "train"), ("test", "test")):
        meta = Prepared(prepared).split(part)
        if kind == "detect":
            folds = [[f] for f in meta.fold] if split == "oof" else [list(FOLDS)] * len(meta)
            rows = [(i, run_dir.name, f, 10.0, 10.0, 90.0, 120.0, rng.uniform()) for i, fs in zip(meta.image_id, folds)
                    for f in fs]  # fmt: skip
            DETECTIONS.write(pd.DataFrame(rows, columns=DETECTIONS.required), run_dir / f"pred_{split}.csv")
            continue
        table = pd.DataFrame({"model": run_dir.name, "image_id": meta.image_id, "study_id": meta.study_id})
        table["fold"] = meta.fold if split == "oof" else -1
        table[STUDY_CLASSES] = rng.dirichlet(np.ones(4), len(meta))
        table["none"] = rng.uniform(size=len(meta))
        CLASSIFIER_IMAGES.write(table, run_dir / f"pred_{split}_image.csv")
    return run_dir


def fake_fuse_run(project: Path, name: str, det_dirs: list[Path], cls_dirs: list[Path], prepared: Path, **params) -> Path:
    """`siimcovid fuse split=test` of the runs' prediction files (in the order given) into <project>/fuse/<name>."""
    det = [str(d / "pred_test.csv") for d in det_dirs]
    cls = [str(d / "pred_test_image.csv") for d in cls_dirs]
    settings = {"det": det, "cls": cls, "split": "test", "data": str(prepared), "workers": 1, **params}
    return call("fuse", project=str(project / "fuse"), name=name, **settings)["dir"]


@pytest.fixture(scope="session")
def yolo_checkpoint(tmp_path_factory) -> Path:
    """yolov5n (1 class) saved as Ultralytics saves a finished fold: the model in fp16, no optimizer, epoch -1."""
    import torch
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel("yolov5n.yaml", nc=1, verbose=False).half()
    path = tmp_path_factory.mktemp("yolo") / "best.pt"
    torch.save({"epoch": -1, "model": model, "ema": None, "optimizer": None, "train_args": {"imgsz": 64}}, path)
    return path


@pytest.fixture(scope="session")
def runs(prepared, yolo_checkpoint, tmp_path_factory) -> Path:
    """A project with a `siimcovid run` named x (run.yaml, detect/x, classify/x, fuse/x) and two more detectors
    and classifiers (v5a, v5b, b3, b5) with a fuse run `ens` that fused them in its own order (each run with its
    prediction tables, each fuse run a real `siimcovid fuse split=test` of them: its fusion.yaml)."""
    project = tmp_path_factory.mktemp("project") / "runs"
    run_yaml = {"name": "x", "detect": {"device": "cpu"}, "detect_predict": {"tta": False, "conf": 0.01}}
    yaml_file(project / "run" / "x" / "run.yaml", {**run_yaml, "classify_predict": {"tta": False}})
    det = [fake_detect_run(project / "detect" / n, prepared, yolo_checkpoint) for n in ("x", "v5a", "v5b")]
    cls = [fake_classify_run(project / "classify" / n, prepared) for n in ("x", "b3", "b5")]
    for seed, run in enumerate(det + cls):
        fake_predictions(run, prepared, run.parent.name, seed)
    fake_fuse_run(project, "x", det[:1], cls[:1], prepared, iou_thr=0.55, none_cls_weight=0.7)
    fake_fuse_run(project, "ens", det[:0:-1], cls[:0:-1], prepared, det_weights=[2.0, 1.0], cls_weights=[1.0, 3.0])
    return project


def export(project: Path, **settings) -> Path:
    return call("export", project=str(project), **settings)


@pytest.fixture
def bundle(runs, tmp_path) -> Path:
    return export(runs, pipeline="x", out=str(tmp_path / "b"))


def rewrite_manifest(bundle: Path, **changes) -> None:
    data = yaml.safe_load((bundle / MANIFEST).read_text())
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    (bundle / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------- export
def test_export_of_a_run_lays_out_members_settings_and_manifest(runs, bundle):
    import hashlib

    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    member = ["fold0.safetensors", "fold1.safetensors", "model.yaml", "settings.yaml"]
    expected = [f"{kind}/x/{f}" for kind in ("classify", "detect") for f in member]
    assert files == sorted(expected + ["fuse.yaml", MANIFEST, "prepare.yaml"])
    manifest = yaml.safe_load((bundle / MANIFEST).read_text())
    assert manifest["format"] == 2 and manifest["half"] is False and manifest["created"].endswith("Z")
    assert set(manifest["files"]) == set(files) - {MANIFEST}
    for rel, entry in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert {"python", "torch", "ultralytics", "timm", "ensemble_boxes"} <= set(manifest["versions"])
    assert manifest["sources"]["run"] == "x" and manifest["dtypes"] == {"detect/x": "float16", "classify/x": "float32"}
    # the manifest travels: no absolute path of the machine that made it, only names relative to the project
    assert manifest["sources"]["members"] == {"detect/x": "detect/x", "classify/x": "classify/x"}
    assert str(runs.parent) not in (bundle / MANIFEST).read_text() and manifest["sources"]["fuse"] == "fuse/x/fusion.yaml"
    # the run's predict settings (run.yaml's detect_predict / classify_predict), the fusion of its submission
    det = yaml.safe_load((bundle / "detect/x/settings.yaml").read_text())
    assert det["tta"] is False and det["conf"] == 0.01 and det["size"] == 64 and det["imgsz"] == {0: 64, 1: 64}
    cls = yaml.safe_load((bundle / "classify/x/settings.yaml").read_text())
    assert {k: cls[k] for k in ("imgsz", "tta", "weights")} == {"imgsz": 64, "tta": "none", "weights": "best"}
    assert yaml.safe_load((bundle / "classify/x/model.yaml").read_text()) == {"family": "timm", **CLS_MODEL}
    det_model = yaml.safe_load((bundle / "detect/x/model.yaml").read_text())
    assert det_model["family"] == "ultralytics" and det_model["yaml"]["nc"] == 1
    assert det_model["yaml"]["yaml_file"] == "yolov5n.yaml"  # the file's name, without the folders of the machine
    fusion = yaml.safe_load((bundle / "fuse.yaml").read_text())
    assert fusion["iou_thr"] == 0.55 and fusion["none_cls_weight"] == 0.7 and fusion["det"] == ["x"] and fusion["cls"] == ["x"]
    # the folder it trained on was prepared at 64 and 128 px: its 64 px images were resized from 128
    bundled = yaml.safe_load((bundle / "prepare.yaml").read_text())
    assert bundled == {"sizes": [64], "resize_from": 128, "ext": "png", "png_level": 0}


def test_classifier_weights_are_the_evaluated_state_dict_in_safetensors(runs, bundle):
    import torch
    from safetensors.torch import load_file

    from siimcovid import weights

    packed = load_file(bundle / "classify/x/fold1.safetensors")
    source = torch.load(runs / "classify/x/fold1/best.pt", weights_only=False)["model"]
    assert set(packed) == set(source) and all(torch.equal(packed[k], v) for k, v in source.items())
    desc = weights.check_description(yaml.safe_load((bundle / "classify/x/model.yaml").read_text()), "classify", "t")
    model = weights.classifier(desc, bundle / "classify/x/fold1.safetensors", "t", torch.device("cpu"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items()) and not model.training


def test_round_trip_gives_members_in_the_fusion_order(runs, tmp_path):
    out = export(runs, detect=[str(runs / "detect/v5a"), str(runs / "detect/v5b")], classify=[str(runs / "classify/b3"),
                 str(runs / "classify/b5")], fuse=str(runs / "fuse/ens"), out=str(tmp_path / "ens"))  # fmt: skip
    opened = open_bundle(out)
    # fuse/ens fused v5b then v5a, b5 then b3: the weights follow that order, so the members do too
    assert [m.name for m in opened.detectors] == ["v5b", "v5a"] and [m.name for m in opened.classifiers] == ["b5", "b3"]
    assert opened.fusion["det_weights"] == [2.0, 1.0] and opened.fusion["cls_weights"] == [1.0, 3.0]
    assert all(m.kind == "detect" and sorted(m.weights) == [0, 1] for m in opened.detectors)
    assert opened.classifiers[0].weights[1] == out / "classify/b5/fold1.safetensors"
    assert opened.classifiers[0].weights[1].is_file()
    assert opened.detectors[0].settings["tta"] is True  # runs named one by one: cfg/detect.yaml's predict defaults
    assert opened.prepare["sizes"] == [64] and opened.manifest["sources"]["fuse"] == "fuse/ens/fusion.yaml"


def test_a_tune_without_a_test_fusion_gives_its_best_parameters_and_its_member_order(runs, prepared, tmp_path):
    det_oof = [str(runs / f"detect/{n}/pred_oof.csv") for n in ("v5b", "v5a")]
    space = {"det_weights": [0.5, 2.0], "iou_thr": [0.4, 0.5]}
    tuned = call("fuse", "tune", det=det_oof, cls=[str(runs / "classify/b3/pred_oof_image.csv")], data=str(prepared),
                 project=str(tmp_path / "fuse"), name="tuned", trials=3, space=space, workers=1)  # fmt: skip
    runs_given = {"detect": [str(runs / "detect/v5a"), str(runs / "detect/v5b")], "classify": [str(runs / "classify/b3")]}
    for fuse in (tuned["dir"], tuned["dir"] / "best.yaml"):  # the folder (no test entry: its tune), or best.yaml
        opened = open_bundle(export(runs, **runs_given, fuse=str(fuse), out=str(tmp_path / fuse.name)))
        assert [m.name for m in opened.detectors] == ["v5b", "v5a"]  # the order tune searched the weights in
        assert all(opened.fusion[k] == tuned["best"][k] for k in ("det_weights", "iou_thr", "none_cls_weight"))
        assert opened.manifest["sources"]["fuse"] == (tmp_path / "fuse/tuned/fusion.yaml").name  # outside the project


def test_runs_named_one_by_one_take_the_settings_their_own_predict_recorded(runs, tmp_path):
    from siimcovid.rundir import save_predict_settings

    save_predict_settings(runs / "detect/v5a", {"conf": 0.05, "iou": 0.6, "tta": False, "max_det": 50, "predict_imgsz": 96})
    save_predict_settings(runs / "classify/b5", {"tta": "none", "weights": "best"})  # as the release before recorded it
    out = export(runs, detect=[str(runs / "detect/v5a"), str(runs / "detect/v5b")], classify=[str(runs / "classify/b3"),
                 str(runs / "classify/b5")], fuse=str(runs / "fuse/ens"), out=str(tmp_path / "ens"))  # fmt: skip
    opened = open_bundle(out)
    det = {m.name: m.settings for m in opened.detectors}
    assert {k: det["v5a"][k] for k in ("conf", "iou", "tta", "max_det", "predict_imgsz")} == {
        "conf": 0.05, "iou": 0.6, "tta": False, "max_det": 50, "predict_imgsz": 96}  # fmt: skip
    assert det["v5b"]["tta"] is True and det["v5b"]["conf"] == 0.001  # recorded nothing: the defaults
    assert {m.name: m.settings["tta"] for m in opened.classifiers} == {"b3": "hflip", "b5": "none"}  # view names


def test_export_refuses_unfinished_folds_and_members_the_fusion_did_not_use(runs, tmp_path):
    import shutil

    partial = Path(shutil.copytree(runs / "classify/b3", tmp_path / "b3"))
    (partial / "fold1" / "done.json").unlink()
    with pytest.raises(SiimError, match="not finished training"):
        export(runs, classify=[str(partial)], out=str(tmp_path / "b"))
    with pytest.raises(SiimError, match=r"fused det models \['v5b', 'v5a'\], but the runs exported are \['v5a'\]"):
        export(runs, detect=[str(runs / "detect/v5a")], classify=[str(runs / "classify/b3"), str(runs / "classify/b5")],
               fuse=str(runs / "fuse/ens"), out=str(tmp_path / "b"))  # fmt: skip
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_an_existing_out_is_refused_unless_overwrite(runs, bundle):
    before = (bundle / MANIFEST).stat().st_ino
    with pytest.raises(SiimError, match="exists: choose another out= or give overwrite=true"):
        export(runs, pipeline="x", out=str(bundle))
    assert (bundle / MANIFEST).stat().st_ino == before
    assert export(runs, pipeline="x", out=str(bundle), overwrite=True) == bundle
    assert (bundle / MANIFEST).stat().st_ino != before and not list(bundle.parent.glob(f".{bundle.name}.*"))  # replaced
    open_bundle(bundle)


def test_half_stores_classifiers_in_fp16_and_they_load_back_as_fp32(runs, bundle, tmp_path):
    import torch
    from safetensors.torch import load_file

    from siimcovid import weights

    half = export(runs, pipeline="x", out=str(tmp_path / "half"), fp16_weights=True)
    rel = "classify/x/fold0.safetensors"
    full_bytes, half_bytes = ((b / rel).stat().st_size for b in (bundle, half))
    assert half_bytes < 0.6 * full_bytes
    assert yaml.safe_load((half / MANIFEST).read_text())["half"] is True
    assert all(v.dtype == torch.float16 for v in load_file(half / rel).values() if v.is_floating_point())
    desc = open_bundle(half).classifiers[0].model
    full_model, half_model = (weights.classifier(desc, b / rel, "t", torch.device("cpu")) for b in (bundle, half))
    for (name, a), b in zip(full_model.state_dict().items(), half_model.state_dict().values()):
        if a.is_floating_point():
            assert b.dtype == torch.float32 and (a - b).abs().max() <= 1e-3 * max(1.0, a.abs().max()), name
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(full_model(x)["study"], half_model(x)["study"], atol=1e-2)
    same = "detect/x/fold0.safetensors"
    assert (half / same).read_bytes() == (bundle / same).read_bytes()  # fp16 already


# ----------------------------------------------------------------------------- open_bundle's checks
def test_a_corrupt_file_is_an_error_naming_it(bundle):
    path = bundle / "detect/x/fold1.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SiimError, match=rf"bundle {bundle}: detect/x/fold1.safetensors is corrupt"):
        open_bundle(bundle)


def test_a_missing_or_an_unlisted_file_is_an_error_naming_it(bundle):
    (bundle / "classify/x/fold0.safetensors").rename(bundle / "classify/x/fold7.safetensors")
    with pytest.raises(SiimError, match="classify/x/fold0.safetensors is missing"):
        open_bundle(bundle)
    (bundle / "classify/x/fold7.safetensors").rename(bundle / "classify/x/fold0.safetensors")
    (bundle / "detect/x/notes.txt").write_text("hello")
    with pytest.raises(SiimError, match="detect/x/notes.txt is not listed in manifest.yaml"):
        open_bundle(bundle)


def test_not_a_bundle_and_a_newer_format_are_errors(bundle, tmp_path):
    with pytest.raises(SiimError, match=r"not a siimcovid bundle \(manifest.yaml missing\)"):
        open_bundle(tmp_path)
    rewrite_manifest(bundle, format=3)
    with pytest.raises(SiimError, match="format 3 was written by a newer siimcovid.*reads format 2: upgrade"):
        open_bundle(bundle)
    rewrite_manifest(bundle, format=1)  # pickled checkpoints: refused, not loaded
    with pytest.raises(SiimError, match="format 1 .* holds pickled checkpoints, which run whatever code.*export the runs again"):
        open_bundle(bundle)


def test_another_major_version_is_an_error_a_minor_one_a_warning(bundle, caplog):
    from importlib import metadata

    rewrite_manifest(bundle, versions={"numpy": "0.0.1"})
    open_bundle(bundle)
    assert "made with other package versions: numpy 0.0.1 (here " in caplog.text
    rewrite_manifest(bundle, versions={"torch": "1.13.1"})
    with pytest.raises(SiimError, match=rf"made with torch 1.13.1, this environment has torch {metadata.version('torch')}"):
        open_bundle(bundle)


def test_a_member_with_no_folds_is_an_error(bundle):
    for k in FOLDS:
        (bundle / f"classify/x/fold{k}.safetensors").unlink()
    from siimcovid.bundle import file_table

    data = yaml.safe_load((bundle / MANIFEST).read_text())
    data["files"] = file_table(bundle)  # a manifest that agrees with the files: only the member check is left
    (bundle / MANIFEST).write_text(yaml.safe_dump(data))
    with pytest.raises(SiimError, match="classify/x/ has no fold<k>.safetensors: a member with no folds"):
        open_bundle(bundle)


def test_zip_round_trip_extracts_once_into_the_cache(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SIIMCOVID_CACHE", str(tmp_path / "cache"))
    out = export(runs, pipeline="x", out=str(tmp_path / "x.zip"))
    with zipfile.ZipFile(out) as zf:
        assert MANIFEST in zf.namelist() and all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    opened = open_bundle(out)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and opened.root == cached[0] and len(cached[0].name) == 64
    assert [m.name for m in opened.detectors] == ["x"] and opened.detectors[0].weights[0].is_file()
    assert open_bundle(out).root == opened.root  # the second open reuses the extracted copy
    opened.detectors[0].weights[0].write_bytes(b"changed")
    with pytest.raises(SiimError, match=f"bundle {out}: detect/x/fold0.safetensors is corrupt.*delete it to extract the zip"):
        open_bundle(out)


def test_a_corrupt_zip_is_an_error(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SIIMCOVID_CACHE", str(tmp_path / "cache"))
    out = export(runs, pipeline="x", out=str(tmp_path / "x.zip"))
    data = bytearray(out.read_bytes())
    with zipfile.ZipFile(out) as zf:
        info = zf.getinfo("detect/x/fold0.safetensors")
    data[info.header_offset + 200] ^= 0xFF  # inside the stored file's bytes
    out.write_bytes(bytes(data))
    with pytest.raises(SiimError, match=f"bundle {out}: detect/x/fold0.safetensors is corrupt"):
        open_bundle(out)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


# ----------------------------------------------------------------------------- from a trained run
@pytest.mark.slow
def test_siimcovid_run_ends_by_exporting_a_bundle_that_opens(tiny_run):
    import torch
    from ultralytics import YOLO

    from siimcovid import weights
    from siimcovid.classify.predict import load_checkpoint_model

    tmp_path, result = tiny_run  # conftest: the session's tiny `siimcovid run`
    opened = open_bundle(result["bundle"])
    assert result["bundle"] == tmp_path / "runs/bundle/e2e" and "export" in result["timings"]
    fuse_test = yaml.safe_load((tmp_path / "runs/fuse/e2e/fuse_test.yaml").read_text())
    assert all(opened.fusion[k] == fuse_test[k] for k in ("iou_thr", "none_det", "none_cls_weight", "det_weights"))
    assert [m.name for m in opened.detectors + opened.classifiers] == ["e2e", "e2e"]
    assert sorted(opened.detectors[0].weights) == [0, 1] and opened.detectors[0].settings["tta"] is False
    # rebuilt from the description and the safetensors: the boxes of the run's own checkpoint, bit for bit
    image = next((tmp_path / "runs/prepare/e2e/64/images/test").iterdir())
    det = opened.detectors[0]
    rebuilt = weights.detector(det.model, det.weights[1], "t")
    trained = YOLO(str(tmp_path / "runs/detect/e2e/fold1/weights/best.pt"))
    boxes = [y.predict(str(image), conf=0.001, imgsz=64, verbose=False)[0].boxes.data for y in (rebuilt, trained)]
    assert len(boxes[0]) and torch.equal(*boxes)
    cls = opened.classifiers[0]
    packed = weights.classifier(cls.model, cls.weights[0], "t", torch.device("cpu"))
    trained, _ = load_checkpoint_model(tmp_path / "runs/classify/e2e/fold0/best.pt", torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(packed.state_dict().values(), trained.state_dict().values()))

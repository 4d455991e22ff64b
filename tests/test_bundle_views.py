"""A bundle's detector levers on a folder of new DICOMs: a member of crop=lung (YOLO, torchvision, a classifier)
carries its lung detector and `siimcovid predict` crops with it as the member's own predict did; two detector families
(YOLO and torchvision's Faster R-CNN) fused, exported with `export pipeline=` (run.yaml's detect2) and predicted, each
member's boxes those of its own `detect predict`.

Tiny models on the 10-study synthetic root prepared with its lung boxes (test_lungs.lung_prepared, 2 folds, 64 px);
the classifier every bundle needs is test_bundle's (random weights, no training). Predict reads the root's test DICOMs
as a plain folder: the same images as the prepared folder's test split, converted again by the bundle's prepare.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_bundle import fake_classify_run, yaml_file
from test_detect_crop import TINY
from test_lungs import lung_prepared  # noqa: F401 (a fixture)
from test_torchvision_family import TINY as TV_TINY

from siimcovid import cli
from siimcovid.bundle import MANIFEST, file_table, open_bundle
from siimcovid.cli import call
from siimcovid.tables import BOX_COLUMNS, CLASSIFIER_IMAGES, DETECTIONS, STUDY_CLASSES
from siimcovid.utils import SiimError

LUNG_CONF = 0.0  # the detector's least lung confidence: every image with a lung box at all is cropped


def same_boxes(found: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Two DETECTIONS tables hold the same boxes (image, fold, corners, conf), within float noise."""
    cols = ["image_id", "fold", *BOX_COLUMNS, "conf"]
    assert len(found) == len(expected)

    def ordered(t):
        return t[cols].sort_values(cols, kind="stable").reset_index(drop=True)

    a, b = ordered(found), ordered(expected)
    assert (a.image_id == b.image_id).all() and (a.fold == b.fold).all()
    assert np.allclose(a[[*BOX_COLUMNS, "conf"]].to_numpy(float), b[[*BOX_COLUMNS, "conf"]].to_numpy(float), atol=1e-3)


def siim_names(out: Path) -> dict[str, str]:
    """{the id predict gave an image or a study of the folder source (its DICOM UIDs): the SIIM root's name of it (the
    file's and the study folder's)}: the prepared folder of the root names them so."""
    meta = pd.read_csv(out / "prepared" / "meta.csv", dtype=str)
    files = [Path(d) for d in meta.dicom]
    return {**dict(zip(meta.image_id, (f.stem for f in files))), **dict(zip(meta.study_id, (f.parts[0] for f in files)))}


def own_boxes(out: Path, kind: str, name: str) -> pd.DataFrame:
    """A member's boxes of predict's out, its images named as the SIIM root names them."""
    table = DETECTIONS.read(out / kind / name / "pred_test.csv")
    return table.assign(image_id=table.image_id.map(siim_names(out)))


def export(project: Path, out: Path, **settings) -> Path:
    return call("export", project=str(project), out=str(out), **settings)


def predict(bundle: Path, source: Path, out: Path) -> dict:
    return call("predict", bundle=str(bundle), source=str(source), out=str(out), workers=0, device="cpu")


def rewrite_manifest(bundle: Path) -> None:
    """The manifest recomputed over the bundle's files as they are now (what whoever edits a bundle can do)."""
    data = yaml.safe_load((bundle / MANIFEST).read_text())
    data["files"] = file_table(bundle)
    (bundle / MANIFEST).write_text(yaml.safe_dump(data, sort_keys=False))


# ----------------------------------------------------------------------------- a detector of crop=lung
@pytest.fixture(scope="module")
def crop_runs(lung_prepared, _tiny_source, tmp_path_factory):  # noqa: F811
    """A lung detector (both folds); two detectors trained with its crops, YOLO det (both folds) and torchvision tv
    (fold 0); a classifier. The detectors' test split predicted whole (<name>-whole.csv kept) and exported, then the
    detectors and the classifier predicted with crop=lung and exported again; each bundle predicted on the root's test
    DICOMs."""
    base = tmp_path_factory.mktemp("crop_views")
    project = base / "runs"
    detect = ["detect", "train", f"data={lung_prepared}", f"project={project / 'detect'}"]
    lung = cli.main([*detect, "task=lung", *TINY, "name=lung"])
    cli.main(["detect", "predict", f"run={lung}", "split=oof,test", "device=cpu", "tta=false", "conf=0.0001"])
    crop = ["crop=lung", f"lung={lung}"]
    runs = {"det": cli.main([*detect, *TINY, "name=det", *crop]), "tv": cli.main([*detect, *TV_TINY, "name=tv", "fold=0", *crop])}
    cls = fake_classify_run(project / "classify" / "cls", lung_prepared)
    members = {"detect": [str(r) for r in runs.values()], "classify": [str(cls)]}
    predict_runs = ["detect", "predict", f"run={runs['det']},{runs['tv']}", "split=test", "device=cpu", "tta=false"]

    cli.main(predict_runs)
    whole = {name: Path(shutil.copy(run / "pred_test.csv", base / f"{name}-whole.csv")) for name, run in runs.items()}
    whole_bundle = export(project, base / "whole", **members)
    views = [*crop, f"lung_conf={LUNG_CONF}"]
    cli.main([*predict_runs, *views])
    cli.main(["classify", "predict", f"run={cls}", "split=test", "device=cpu", "tta=false", "workers=0", *views])
    crop_bundle = export(project, base / "crop", **members)
    dicoms = _tiny_source / "test"
    out = {"whole": predict(whole_bundle, dicoms, base / "out-whole"), "crop": predict(crop_bundle, dicoms, base / "out-crop")}
    bundles = {"whole": whole_bundle, "crop": crop_bundle}
    return {"lung": lung, "runs": runs, "cls": cls, "whole": whole, "bundles": bundles, "out": out}


@pytest.mark.slow
def test_a_member_of_crop_lung_carries_its_lung_detector(crop_runs):
    crop, whole = crop_runs["bundles"]["crop"], crop_runs["bundles"]["whole"]
    manifest = yaml.safe_load((crop / MANIFEST).read_text())
    assert {"lung/lung/fold0.safetensors", "lung/lung/fold1.safetensors", "lung/lung/model.yaml"} <= set(manifest["files"])
    assert manifest["sources"]["members"]["lung/lung"] == "detect/lung"  # relative to the project, as every member
    for member in ("detect/det", "detect/tv"):
        settings = yaml.safe_load((crop / member / "settings.yaml").read_text())
        assert settings["crop"] == "lung" and settings["lung"] == "lung"  # the lung member's name, not the run's path
        assert settings["lung_conf"] == LUNG_CONF and {"crop_margin", "view_fusion", "view_iou"} <= set(settings)
    assert yaml.safe_load((crop / "classify" / "cls" / "settings.yaml").read_text())["lung"] == "lung"  # one for all
    assert [m.name for m in open_bundle(crop).lungs] == ["lung"]
    # predicted whole, the same runs export as before: no lung member, no view settings
    assert not (whole / "lung").exists() and "crop" not in yaml.safe_load((whole / "detect/det/settings.yaml").read_text())
    assert open_bundle(whole).lungs == []


@pytest.mark.slow
def test_predict_crops_with_the_bundles_lung_detector_as_detect_predict_did(crop_runs):
    out, whole_out = crop_runs["out"]["crop"]["out"], crop_runs["out"]["whole"]["out"]
    lung = own_boxes(out, "lung", "lung")  # the lung member first, on the new images
    same_boxes(lung, DETECTIONS.read(crop_runs["lung"] / "pred_test.csv"))
    record = yaml.safe_load((out / "predict.yaml").read_text())
    n = crop_runs["out"]["crop"]["n_images"]
    views = {"lung": "lung", "cropped": {0: n, 1: n}}
    assert record["views"] == {"detect/det": views, "detect/tv": {"lung": "lung", "cropped": {0: n}}, "classify/cls": views}
    assert "views" not in yaml.safe_load((whole_out / "predict.yaml").read_text())
    for name, run in crop_runs["runs"].items():
        same_boxes(own_boxes(out, "detect", name), DETECTIONS.read(run / "pred_test.csv"))  # its `detect predict crop=lung`
        same_boxes(own_boxes(whole_out, "detect", name), DETECTIONS.read(crop_runs["whole"][name]))  # and whole: whole
    probs = CLASSIFIER_IMAGES.read(out / "classify" / "cls" / "pred_test_image.csv")  # its own `classify predict crop=lung`
    own = CLASSIFIER_IMAGES.read(crop_runs["cls"] / "pred_test_image.csv").set_index("image_id")
    probs = probs.assign(image_id=probs.image_id.map(siim_names(out))).set_index("image_id").loc[own.index]
    columns = [*STUDY_CLASSES, "none"]
    assert np.allclose(probs[columns].to_numpy(float), own[columns].to_numpy(float), atol=1e-4)


@pytest.mark.slow
def test_each_fold_crops_to_its_lung_members_boxes(crop_runs, lung_prepared, _tiny_source, tmp_path, monkeypatch):  # noqa: F811
    """The tiny lung detector's best box is about the whole image (its crop shows what the whole view shows): here the
    bundle's lung member is made to find known boxes (test_detect_crop.fake_lung_run's: each image less 15% of each
    side, fold by fold), and each member's boxes are those of `detect predict crop=lung` with a lung run of the same
    boxes, not its whole-image boxes."""
    from test_detect_crop import fake_lung_run

    from siimcovid.data.prepared import Prepared
    from siimcovid.predict import stage

    fake = fake_lung_run(tmp_path / "lung", Prepared(lung_prepared))
    own = {name: Path(shutil.copytree(run, tmp_path / name, copy_function=os.link)) for name, run in crop_runs["runs"].items()}
    runs = ",".join(map(str, own.values()))  # the runs' copies (their weights linked), predicted with the known lung boxes
    views = ["crop=lung", f"lung={fake}", f"lung_conf={LUNG_CONF}"]
    cli.main(["detect", "predict", f"run={runs}", "split=test", "device=cpu", "tta=false", *views])
    real = stage.predict_detector

    def known_lungs(member, prepared, hw, tta, **views):
        if member.kind != "lung":
            return real(member, prepared, hw, tta, **views)
        uids = {Path(d).stem: uid for uid, d in zip(prepared.meta.image_id, prepared.meta.dicom)}  # the new images' ids
        table = DETECTIONS.read(fake / "pred_test.csv")
        return table.assign(image_id=table.image_id.map(uids), model=member.name)

    monkeypatch.setattr(stage, "predict_detector", known_lungs)
    result = predict(crop_runs["bundles"]["crop"], _tiny_source / "test", tmp_path / "out")
    for name in crop_runs["runs"]:
        cropped = own_boxes(result["out"], "detect", name)
        same_boxes(cropped, DETECTIONS.read(own[name] / "pred_test.csv"))
        with pytest.raises(AssertionError):  # the same weights: the crop views changed the boxes
            same_boxes(cropped, DETECTIONS.read(crop_runs["whole"][name]))


@pytest.mark.slow
def test_a_missing_short_or_changed_lung_member_is_refused(crop_runs, _tiny_source, tmp_path):
    crop = crop_runs["bundles"]["crop"]

    def copy(name: str) -> Path:
        return Path(shutil.copytree(crop, tmp_path / name))

    gone = copy("gone")
    shutil.rmtree(gone / "lung")
    rewrite_manifest(gone)
    with pytest.raises(SiimError, match=r"crops with the lung detector 'lung', but lung/lung/ is not in the bundle"):
        open_bundle(gone)
    short = copy("short")
    (short / "lung" / "lung" / "fold1.safetensors").unlink()
    rewrite_manifest(short)
    with pytest.raises(SiimError, match=r"detect/det crops fold\(s\) \[1\] with lung/lung, which has no such fold"):
        open_bundle(short)
    changed = copy("changed")
    weights = changed / "lung" / "lung" / "fold0.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    with pytest.raises(SiimError, match="lung/lung/fold0.safetensors is corrupt"):
        predict(changed, _tiny_source / "test", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any work
    unused = copy("unused")  # the members' views removed: their lung detector is nobody's
    for member in ("detect/det", "detect/tv", "classify/cls"):
        settings = yaml.safe_load((unused / member / "settings.yaml").read_text())
        for key in ("crop", "lung", "crop_margin", "lung_conf", "view_fusion", "view_iou"):
            settings.pop(key, None)
        (unused / member / "settings.yaml").write_text(yaml.safe_dump(settings))
    rewrite_manifest(unused)
    with pytest.raises(SiimError, match="lung/lung/ is the lung detector of no member"):
        open_bundle(unused)
    halfway = copy("halfway")  # crop=lung without the settings that make its windows
    settings = yaml.safe_load((halfway / "detect/det/settings.yaml").read_text())
    del settings["lung_conf"]
    (halfway / "detect/det/settings.yaml").write_text(yaml.safe_dump(settings))
    rewrite_manifest(halfway)
    with pytest.raises(SiimError, match="crop=lung without lung_conf"):
        open_bundle(halfway)


@pytest.mark.slow
def test_export_refuses_a_lung_run_that_is_gone_or_short_of_a_fold(crop_runs, tmp_path):
    det, cls = crop_runs["runs"]["det"], crop_runs["cls"]
    lung = Path(shutil.copytree(crop_runs["lung"], tmp_path / "lung"))
    shutil.rmtree(lung / "fold1")  # its fold 1 never trained
    copy = Path(shutil.copytree(det, tmp_path / "det"))
    saved = yaml.safe_load((copy / "predict.yaml").read_text())
    (copy / "predict.yaml").write_text(yaml.safe_dump({**saved, "lung": str(lung)}))
    with pytest.raises(SiimError, match=r"crops with the lung run .*lung, which has no finished fold\(s\) \[1\]"):
        export(tmp_path, tmp_path / "b1", detect=[str(copy)], classify=[str(cls)])
    shutil.rmtree(lung)
    with pytest.raises(SiimError, match="its predict cropped with lung=.*, which is not found"):
        export(tmp_path, tmp_path / "b2", detect=[str(copy)], classify=[str(cls)])
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


@pytest.mark.slow
def test_predict_sees_whole_the_images_a_lung_fold_found_no_box_on(crop_runs, _tiny_source, tmp_path, monkeypatch, caplog):  # noqa: F811
    """The bundle's lung member finds no lung on the first new image (no box of any fold) nor on any image with its fold
    1: predict completes, and each (image, fold) without a lung box is seen whole only, a detector's boxes those of the
    bundle predicted whole, the others those of the bundle predicted with every crop (the classifier's probabilities are
    not compared: the tiny lung detector's box is about the whole image, and its crop view gives what the whole does)."""
    from siimcovid.predict import stage

    real, first = stage.predict_detector, {}

    def lost_lungs(member, prepared, hw, tta, **views):
        table = real(member, prepared, hw, tta, **views)
        if member.kind != "lung":
            return table
        first["id"] = str(prepared.split("test").image_id.iloc[0])
        return table[(table.fold == 0) & (table.image_id != first["id"])]

    monkeypatch.setattr(stage, "predict_detector", lost_lungs)
    with caplog.at_level("INFO", logger="siimcovid"):
        result = predict(crop_runs["bundles"]["crop"], _tiny_source / "test", tmp_path / "out")
    out, n = result["out"], result["n_images"]
    record = yaml.safe_load((out / "predict.yaml").read_text())["views"]
    assert record["detect/det"]["cropped"] == record["classify/cls"]["cropped"] == {0: n - 1, 1: 0}
    assert record["detect/tv"]["cropped"] == {0: n - 1}
    assert f"detect/det: no lung crop for some images (fold 0: 1 of {n}, fold 1: {n} of {n}" in caplog.text
    outs = {view: crop_runs["out"][view]["out"] for view in ("whole", "crop")}
    for name in crop_runs["runs"]:
        found = DETECTIONS.read(out / "detect" / name / "pred_test.csv")
        table = {view: DETECTIONS.read(o / "detect" / name / "pred_test.csv") for view, o in outs.items()}
        cropped = lambda t: (t.fold == 0) & (t.image_id != first["id"])  # noqa: E731
        expected = pd.concat([table["crop"][cropped(table["crop"])], table["whole"][~cropped(table["whole"])]])
        same_boxes(found, expected)


def lung_copy(crop_runs, tmp_path: Path) -> tuple[Path, Path]:
    """(a copy of the lung run, a copy of the detector det whose predict cropped with that copy), weights linked; the
    classifier to export beside it must not crop with the lung run itself (two lung runs of one name)."""
    lung = Path(shutil.copytree(crop_runs["lung"], tmp_path / "lung", copy_function=os.link))
    det = Path(shutil.copytree(crop_runs["runs"]["det"], tmp_path / "det", copy_function=os.link))
    saved = yaml.safe_load((det / "predict.yaml").read_text())
    (det / "predict.yaml").unlink()  # a link: written anew, the run's own stays
    (det / "predict.yaml").write_text(yaml.safe_dump({**saved, "lung": str(lung)}))
    return lung, det


@pytest.mark.slow
def test_export_packs_the_lung_folds_the_members_crop_with_and_open_refuses_more(crop_runs, lung_prepared, tmp_path):  # noqa: F811
    plain = fake_classify_run(tmp_path / "classify" / "plain", lung_prepared)  # whole images: crops no fold
    bundle = export(tmp_path, tmp_path / "b", detect=[str(crop_runs["runs"]["tv"])], classify=[str(plain)])  # tv: fold 0
    files = set(yaml.safe_load((bundle / MANIFEST).read_text())["files"])
    assert "lung/lung/fold0.safetensors" in files and "lung/lung/fold1.safetensors" not in files
    settings_file = bundle / "lung/lung/settings.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    assert set(settings["imgsz"]) == {0}
    assert [sorted(m.weights) for m in open_bundle(bundle).lungs] == [[0]]
    shutil.copy(bundle / "lung/lung/fold0.safetensors", bundle / "lung/lung/fold1.safetensors")  # as the release before
    settings_file.write_text(yaml.safe_dump({**settings, "imgsz": {**settings["imgsz"], 1: settings["imgsz"][0]}}))
    rewrite_manifest(bundle)
    with pytest.raises(SiimError, match=r"lung/lung/fold1.safetensors: lung fold\(s\) \[1\] crop for no member .*folds \[0\]"):
        open_bundle(bundle)


@pytest.mark.slow
def test_export_refuses_a_member_whose_lung_run_was_predicted_again(crop_runs, tmp_path):
    lung, det = lung_copy(crop_runs, tmp_path)
    oof = DETECTIONS.read(lung / "pred_oof.csv")
    (lung / "pred_oof.csv").unlink()
    DETECTIONS.write(oof.assign(conf=oof.conf * 0.5), lung / "pred_oof.csv")  # other boxes than det trained its crops with
    with pytest.raises(SiimError, match=r"det/detect.yaml records its crops from lung boxes .*, but .*lung/pred_oof.csv is now"):
        export(tmp_path, tmp_path / "b", detect=[str(det)], classify=[str(crop_runs["cls"])])
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_export_names_a_lung_run_that_saved_no_predict_settings(crop_runs, lung_prepared, tmp_path, caplog):  # noqa: F811
    lung, det = lung_copy(crop_runs, tmp_path)
    (lung / "predict.yaml").unlink()
    plain = fake_classify_run(tmp_path / "classify" / "plain", lung_prepared)
    with caplog.at_level("INFO", logger="siimcovid"):
        export(tmp_path, tmp_path / "b", detect=[str(det)], classify=[str(plain)])
    notes = [line for line in caplog.text.splitlines() if "saved no predict settings" in line]
    assert len(notes) == 1 and str(lung) in notes[0] and str(det) not in notes[0]  # det's predict saved them


# ----------------------------------------------------------------------------- two detector families
@pytest.fixture(scope="module")
def two_families(lung_prepared, _tiny_source, tmp_path_factory):  # noqa: F811
    """A `siimcovid run` named p as it leaves its project (run.yaml with a detect2 section of family=torchvision; the
    detectors p and p-torchvision; the classifier p; fuse/p: `fuse split=test` of them with det_scale), exported with
    pipeline=p and predicted on the root's test DICOMs."""
    base = tmp_path_factory.mktemp("two_families")
    project = base / "runs"
    detect = f"project={project / 'detect'}"
    yolo = cli.main(["detect", "train", f"data={lung_prepared}", *TINY, detect, "name=p", "fold=0"])
    tv = cli.main(["detect", "train", f"data={lung_prepared}", *TV_TINY, detect, "name=p-torchvision", "fold=0"])
    cli.main(["detect", "predict", f"run={yolo}", "split=test", "device=cpu", "tta=false"])
    cli.main(["detect", "predict", f"run={tv}", "split=test", "device=cpu", "tta=true"])
    cls = fake_classify_run(project / "classify" / "p", lung_prepared)
    cli.main(["classify", "predict", f"run={cls}", "split=test", "device=cpu", "tta=false", "workers=0"])
    det = [str(yolo / "pred_test.csv"), str(tv / "pred_test.csv")]
    fused = call("fuse", project=str(project / "fuse"), name="p", det=det, cls=[str(cls / "pred_test_image.csv")],
                 split="test", data=str(lung_prepared), workers=1, det_scale=[1.0, 0.78])  # fmt: skip
    run_yaml = {"name": "p", "detect2": {"family": "torchvision"}, "detect_predict": {"tta": False}}
    yaml_file(project / "run" / "p" / "run.yaml", {**run_yaml, "classify_predict": {"tta": False}})
    bundle = export(project, base / "bundle", pipeline="p")
    return {"yolo": yolo, "tv": tv, "fused": fused, "bundle": bundle, "out": predict(bundle, _tiny_source / "test", base / "out")}


@pytest.mark.slow
def test_two_detector_families_fused_through_export_and_predict(two_families):
    from siimcovid.submission import read_submission

    bundle, result = two_families["bundle"], two_families["out"]
    members = yaml.safe_load((bundle / MANIFEST).read_text())["sources"]["members"]
    assert set(members) == {"detect/p", "detect/p-torchvision", "classify/p"}  # detect2's detector too
    assert yaml.safe_load((bundle / "detect/p-torchvision/model.yaml").read_text())["family"] == "torchvision"
    fusion = yaml.safe_load((bundle / "fuse.yaml").read_text())
    assert fusion["det"] == ["p", "p-torchvision"] and fusion["det_scale"] == [1.0, 0.78]
    opened = open_bundle(bundle)
    assert [(m.name, m.family) for m in opened.detectors] == [("p", ""), ("p-torchvision", "torchvision")]
    out = result["out"]
    for name, run in (("p", two_families["yolo"]), ("p-torchvision", two_families["tv"])):  # each as its own predict
        same_boxes(own_boxes(out, "detect", name), DETECTIONS.read(run / "pred_test.csv"))
    sample = out / "sample_submission.csv"
    submission = read_submission(result["fused"]["files"]["submission"], sample=sample)  # every id, as Kaggle checks
    assert len(submission) == len(pd.read_csv(sample))
    own = read_submission(two_families["fused"]["files"]["submission"])  # the fuse run's, of the same images
    names = siim_names(out)
    rows = zip(submission.id.str.rsplit("_", n=1), submission.PredictionString)
    siim = {f"{names[uid]}_{suffix}": row for (uid, suffix), row in rows}
    assert siim == dict(zip(own.id, own.PredictionString))

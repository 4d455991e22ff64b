"""`siimcovid predict bundle=<bundle> source=<SIIM root | DICOM folder | one DICOM> out=<folder>`.

A bundle's models on new data, with nothing else present (no runs folder, no train data, no network):

    1. open_bundle: every check of the bundle (signature with trust=, files, checksums, versions) before any work
    2. `siimcovid prepare` of the source into <out>/prepared with the bundle's conversion settings
       (test split only; layout siim for a SIIM root, else folder; unreadable files skipped and listed)
    3. crop=lung: the lung detector(s) the members crop with, first -> <out>/lung/<name>/pred_test.csv
       (siimcovid.predict.members: fold k of a member crops with lung fold k's boxes; predict.yaml `views`
       counts the images each fold saw cropped)
    4. every detector member's folds on every image -> <out>/detect/<name>/pred_test.csv
    5. every classifier member's folds -> <out>/classify/<name>/pred_test_image.csv (a none model, task=none:
       pred_test_none.csv, tables.NONE_IMAGES, fused as none_cls)
    6. `siimcovid fuse split=test` of those with the bundle's fusion settings -> <out>/fuse/
       (submission.csv checked against the SIIM root's sample_submission.csv, or against one
       written from the prepared images: every study and image found)
    7. <out>/submission.csv (SIIM source), then the tables, pictures and index.html (siimcovid.predict.view)
    8. dicom=sr,gsps,sc: the results as DICOM objects under <out>/dicom/, listed in dicom.csv (siimcovid.predict.dicom)

On a SIIM root the submission is the one the bundle's run wrote with `fuse split=test` on the same
images (same conversion, same models, same batches, same fusion). Re-running with the same out=
resumes: prepare skips converted images, and each member's table is reused when predict.yaml says
this bundle made it on these images with this TTA, precision and backend (siimcovid.predict.record).

backend= (torch by default) runs each member's folds with torch or with an engine the bundle holds (`export
formats=openvino,onnx`: siimcovid.bundle.engines); the engine replaces the network's forward only, inside the same
Ultralytics predict and classifier TTA, so an fp32 engine gives torch's tables within 1e-4 (tests/test_engines.py).

out= follows the outputs rule (siimcovid.outputs): a new, empty or own folder (it holds predict.yaml), else
overwrite=true (which reaches its prepare and fuse steps); never the root, the home folder or a folder holding the
source. predict.yaml is written first and lists every file predict writes: only those are ever replaced or removed (a
user's files beside them stay). A folder the release before that rule wrote is adopted (earlier_outputs).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from pathlib import Path

import pandas as pd

from siimcovid import __version__
from siimcovid.classify.none import none_path, none_table
from siimcovid.config import Config, fusion_keys
from siimcovid.data.prepare import NothingReadable
from siimcovid.data.prepared import SKIPPED_CSV, Prepared
from siimcovid.outputs import Earlier, check_out, check_outside, open_out, present, read_mapping
from siimcovid.predict.members import (
    Hardware,
    crop_counts,
    lung_boxes,
    member_backend,
    member_engine,
    member_tta,
    predict_classifier,
    predict_detector,
)
from siimcovid.predict.record import FUSE_DIR, RECORD, Record, images_id
from siimcovid.predict.source import input_checks, loader_workers, pool_workers, prepare_settings, source_layout, write_sample
from siimcovid.stages import stage_config
from siimcovid.submission import write_submission
from siimcovid.tables import (
    DETECTIONS,
    IMAGE_SUFFIX,
    NONE_IMAGES,
    SAMPLE,
    SAMPLE_SUBMISSION,
    SKIPPED,
    STUDY_CLASSES,
    STUDY_SUFFIX,
    SUBMISSION,
)
from siimcovid.utils import LOGGER, DataError, SiimError

NONE_TABLE = none_path(Path(), "test").name  # a none model member's table (classify task=none), fused as none_cls


def offline() -> None:
    """Nothing in predict touches the network: Ultralytics and the Hugging Face hub (timm) are told so
    before they are imported (a user's own setting wins)."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def check_inputs(cfg: Config):
    """The bundle (opened and verified), the source and its layout, the output folder: checked before any work."""
    for key in ("bundle", "source", "out"):
        if not cfg[key]:
            raise SiimError(f"predict needs {key}=: `siimcovid predict bundle=<bundle> source=<SIIM root | DICOMs> out=<folder>`")
    if cfg.get("budget") and not cfg.plan:
        raise SiimError("budget= is checked against the plan (siimcovid.predict.plan): give plan=true, the default, with it")
    source, out = Path(cfg.source), Path(cfg.out)
    layout = source_layout(source)
    check_out(out, RECORD, cfg.overwrite, sources=[source], earlier=earlier_outputs)
    if layout == "folder":
        check_outside(out, source)
    if layout == "folder" and source.is_file():
        from siimcovid.data.folder import file_ids

        try:
            file_ids(source, source)
        except DataError as e:
            raise SiimError(f"source={source} is not an image to predict: {e.reason}") from None
    from siimcovid.bundle import open_bundle

    bundle = open_bundle(cfg.bundle, cfg.trust)
    if not bundle.classifiers:  # fuse's fallback, train class priors, does not travel: there is no train split here
        raise SiimError(f"bundle {cfg.bundle} holds no classifier: predict needs one for the study probabilities")
    return bundle, source, layout, out


def check_engines(bundle, hw: Hardware, name) -> None:
    """Before any work: every member's engine can run here (member_engine: a named backend a member lacks, a missing
    runtime), and precision=int8 has an int8 engine to run."""
    from siimcovid.bundle.engines import INT8

    members = [*bundle.detectors, *bundle.classifiers, *bundle.lungs]
    for member in members:
        member_engine(member, hw)
    if hw.int8 and not any(INT8 in m.engines for m in members):
        raise SiimError(
            f"predict: precision=int8: bundle {name} holds no int8 engine (`siimcovid export ... int8=detect,classify` "
            "writes them): precision=auto computes in what this CPU has"
        )


def member_precision(member, hw: Hardware, warn: bool = True) -> str:
    """The precision a member computes in: predict's (hw.precision), or fp32 for a member of a family that does not
    read it (Family.reads_precision: the built-in families do), said when `warn` (once per member: when it predicts)."""
    from siimcovid.bundle.engines import INT8
    from siimcovid.bundle.members import LUNG_KIND
    from siimcovid.engine.family import family_class

    stage = "detect" if member.kind in ("detect", LUNG_KIND) else "classify"
    family = family_class(member.family or ("yolo" if stage == "detect" else "timm"), stage)
    if member_engine(member, hw) == INT8:
        return "int8"
    if hw.precision != "fp32" and not family.reads_precision:
        if warn:
            LOGGER.warning(f"predict: {member.kind}/{member.name} (family={family.name}) predicts in fp32, not {hw.precision}")
        return "fp32"
    return hw.precision


def hardware(cfg: Config) -> Hardware:
    """Where the members run: the device, and on the CPU its precision (precision=auto: what this CPU has, logged;
    int8: the bundle's int8 engines, the other members as auto)."""
    from siimcovid.engine.devices import cpu_has_bf16, cpu_precision, torch_device

    device = torch_device(cfg.device)
    int8 = cfg.precision == "int8"
    if int8 and (device.type != "cpu" or cfg.backend not in ("openvino", "auto")):
        raise SiimError(
            f"predict: precision=int8 runs the bundle's int8 engines (`export int8=`) with OpenVINO on the CPU: "
            f"backend=auto (or openvino) and device=cpu, not backend={cfg.backend} device={cfg.device}"
        )
    precision = cpu_precision(device, "auto" if int8 else cfg.precision)
    if device.type == "cpu":
        cpu = f"precision=auto: this CPU {'has' if cpu_has_bf16() else 'lacks'} AVX-512 BF16 / AMX"
        why = {"auto": f" ({cpu})", "int8": f" where a member has no int8 engine ({cpu})"}
        LOGGER.info(f"predict: the members compute in {precision} on the CPU{why.get(cfg.precision, '')}")
    return Hardware(device, cfg.batch, loader_workers(cfg.workers), cfg.half, precision, cfg.backend, int8)


class Steps:
    """Times each step of predict into the record (predict.yaml `seconds`) and the log."""

    def __init__(self, record: Record):
        self.record = record

    def run(self, step: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.record.timed(step, time.perf_counter() - start)
        return result


def prepare_source(bundle, cfg: Config, source: Path, layout: str, out: Path) -> Prepared:
    """`siimcovid prepare` of the source into <out>/prepared as the bundle's models were trained (resumes)."""
    from siimcovid.data.prepare import prepare

    checks = input_checks(cfg)  # max_pixels, modality_check: what prepare refuses to read
    settings = prepare_settings(
        bundle.prepare, source, layout, out / "prepared", cfg.workers, cfg.on_error, overwrite=cfg.overwrite, **checks
    )
    return Prepared(prepare(stage_config("prepare", None, settings)))


def show_skipped(path: Path, most: int = 20) -> None:
    """The files prepare skipped, as warnings (when predict removes the out it created, their list goes with it)."""
    if not path.is_file():
        return
    rows = SKIPPED.read(path)
    lines = [f"  {r.file}: {r.problem}" for r in rows.head(most).itertuples()]
    more = f"\n  ... and {len(rows) - most} more" if len(rows) > most else ""
    LOGGER.warning(f"WARNING: predict: the {len(rows)} file(s) skipped:\n" + "\n".join(lines) + more)


def list_skipped(prepared: Prepared, out: Path, record: Record) -> Path | None:
    """<out>/skipped.csv: the source files prepare could not read (absent when none), with a warning."""
    rows = prepared.skipped()
    path = out / SKIPPED_CSV
    if rows.empty:
        record.remove(path)
        return None
    record.claim(path)
    SKIPPED.write(rows, path)
    LOGGER.warning(f"WARNING: predict: {len(rows)} file(s) of the source are not readable images and were skipped: see {path}")
    return path


def member_table(
    member, prepared: Prepared, hw: Hardware, cfg: Config, out: Path, record: Record, lungs: dict | None = None
) -> Path:
    """A member's prediction table on the prepared test images: reused when the record vouches for it, else predicted.
    lungs: {lung member name: LungBoxes of the images} (lung_tables), which a member of crop=lung crops with. A lung
    member predicts with its own TTA (its boxes are the crops the members were made with, not a prediction)."""
    from siimcovid.bundle.members import lung_of
    from siimcovid.classify.predict import study_table, table_paths, write_tables

    key, table, entry = member_entry(member, prepared, hw, cfg, out)
    boxes, tta = member.kind != "classify", entry["tta"]
    none = not boxes and member.settings.get("task") == "none"  # a binary none model: its none table (fuse none_cls=)
    lung = lung_of(member.settings)
    if lung is not None:  # the images each fold sees cropped: what the views did, in the record
        record.views(key, lung, crop_counts(member, lungs, prepared))
    if record.reusable(key, entry, table):
        LOGGER.info(f"predict: {key}: reusing {table} (this bundle, these images)")
        return table
    record.forget(key)
    record.claim(*([table] if boxes or none else table_paths(table.parent, "test")))
    found = predict_member(member, prepared, hw, tta, lungs)
    if boxes:
        DETECTIONS.write(found, table)
    elif none and not member.family:  # (a family of its own writes the tables of a classifier, as it did)
        NONE_IMAGES.write(none_table(found), table)
    else:
        write_tables(table.parent, "test", found, study_table(found))
    record.done(key, entry)
    return table


def member_entry(member, prepared: Prepared, hw: Hardware, cfg: Config, out: Path, warn: bool = True) -> tuple[str, Path, dict]:
    """(key, table, record entry) of a member: what its table would be made from now (the record reuses a table only
    for the same entry: a crop=lung member's includes its lung boxes' sha256, which another backend or precision of
    the lung member changes); warn: member_precision's (the plan asks first, quietly)."""
    from siimcovid.bundle.members import LUNG_KIND, lung_of
    from siimcovid.utils import file_sha256

    key, boxes = f"{member.kind}/{member.name}", member.kind != "classify"
    none = not boxes and member.settings.get("task") == "none"
    tta = member_tta(member, None if member.kind == LUNG_KIND else cfg.tta)
    table = out / key / ("pred_test.csv" if boxes else NONE_TABLE if none else "pred_test_image.csv")
    entry = {"images": images_id(prepared.split("test").image_id), "tta": tta, "half": hw.half and hw.device.type == "cuda"}
    entry["precision"] = member_precision(member, hw, warn)  # a table of another precision is predicted again, not reused
    entry["backend"] = member_backend(member, hw)  # and of another engine
    lung = lung_of(member.settings)
    if lung is not None:  # crop=lung: the crops are its lung member's boxes, as this run predicted them
        boxes_file = out / LUNG_KIND / lung / "pred_test.csv"
        entry["lung_sha256"] = file_sha256(boxes_file) if boxes_file.is_file() else None
    return key, table, entry


def predict_member(member, prepared: Prepared, hw: Hardware, tta, lungs: dict | None = None) -> pd.DataFrame:
    """Every fold of a member on every test image of `prepared`: its family's bundle kind's predict (a family of its
    own), predict_detector or predict_classifier; a member of crop=lung crops with its lung member's boxes."""
    from siimcovid.bundle.members import lung_of

    views = {"lungs": lungs} if lung_of(member.settings) is not None else {}  # a family without views is never given them
    if member.family:  # a family of its own: its bundle_kind's predict
        from siimcovid.bundle.members import kind_of

        return kind_of(member.kind, member.family).predict(member, prepared, hw, tta, **views)
    if member.kind != "classify":
        return predict_detector(member, prepared, hw, tta, **views)
    return predict_classifier(member, prepared, hw, tta, **views)


def run_plan(bundle, prepared: Prepared, hw: Hardware, cfg: Config, lungs: dict, out: Path, record: Record) -> None:
    """siimcovid.predict.plan on the members whose tables this out= does not hold for these images and settings (the
    record's own test, member_entry); the plan and its time go into the record (predict.yaml `plan`, `seconds.plan`)
    when it ran."""
    from siimcovid.predict.plan import plan

    def reused(member) -> bool:
        key, table, entry = member_entry(member, prepared, hw, cfg, out, warn=False)
        return record.reusable(key, entry, table)

    todo = [m for m in [*bundle.detectors, *bundle.classifiers] if not reused(m)]
    if not todo:
        return
    start = time.perf_counter()
    view = copy.copy(bundle)
    view.detectors, view.classifiers = [m for m in todo if m.kind != "classify"], [m for m in todo if m.kind == "classify"]
    planned = plan(view, prepared, hw, cfg, lungs, dict(record.data["seconds"]), predict_member)
    if planned is not None:
        record.data["plan"] = planned
        record.data["seconds"]["plan"] = round(time.perf_counter() - start, 3)
        record.save()


def lung_tables(bundle, prepared: Prepared, hw: Hardware, cfg: Config, out: Path, record: Record, steps) -> dict:
    """crop=lung: each lung member's boxes of the images, first ({name: siimcovid.views.LungBoxes}; {} when no member
    crops)."""
    tables = {m.name: steps.run(f"{m.kind}/{m.name}", member_table, m, prepared, hw, cfg, out, record) for m in bundle.lungs}
    return {name: lung_boxes(DETECTIONS.read(path), name, cfg.bundle) for name, path in tables.items()}


def sample_for(layout: str, source: Path, prepared: Prepared, out: Path, record: Record) -> Path:
    """The sample submission fixing the fused rows: the SIIM root's (less the images prepare could not read, which
    complete_submission fills in), else one of every prepared study and image (<out>/sample_submission.csv: beside
    fuse's folder, which holds only fuse's files)."""
    path = out / SAMPLE_SUBMISSION
    if layout != "siim":
        record.claim(path)
        return write_sample(prepared.split("test"), path)
    sample, readable = SAMPLE.read(source / SAMPLE_SUBMISSION), set(prepared.split("test").image_id)
    unread = unreadable_ids(sample, readable, prepared)
    if not unread:
        record.remove(path)  # an earlier run's, when it had unreadable images
        return source / SAMPLE_SUBMISSION
    record.claim(path)
    return SAMPLE.write(sample[~sample["id"].isin(unread)], path)


def unreadable_ids(sample, readable: set, prepared: Prepared) -> set:
    """Sample ids prepare could not give an image for: unreadable images, and studies left with none."""
    test = prepared.split("test")
    studies = {f"{s}{STUDY_SUFFIX}" for s in test.study_id}
    ids = sample["id"]
    images = ids[ids.str.endswith(IMAGE_SUFFIX)]
    unread = {i for i in images if i[: -len(IMAGE_SUFFIX)] not in readable}
    return unread | {i for i in ids[ids.str.endswith(STUDY_SUFFIX)] if i not in studies}


# What a submission says for what could not be read: no box, and a study whose class is anyone's guess.
UNREAD_IMAGE = "none 1 0 0 1 1"
UNREAD_STUDY = " ".join(f"{c} 0.25 0 0 1 1" for c in STUDY_CLASSES)


def complete_submission(fused: dict, source: Path, out: Path, record: Record) -> Path:
    """<out>/submission.csv: the fused rows, plus a row for every sample id whose image could not be read (a
    Kaggle re-run on hidden data cannot be fixed by hand: one bad DICOM must not cost the submission)."""
    sample = SAMPLE.read(source / SAMPLE_SUBMISSION)
    sub = SUBMISSION.read(fused["files"]["submission"]).set_index("id")
    missing = [i for i in sample["id"] if i not in sub.index]
    if missing:
        fill = [UNREAD_IMAGE if i.endswith(IMAGE_SUFFIX) else UNREAD_STUDY for i in missing]
        sub = pd.concat([sub, pd.DataFrame({"PredictionString": fill}, index=pd.Index(missing, name="id"))])
        LOGGER.warning(
            f"WARNING: predict: {len(missing)} submission row(s) of images that could not be read (see skipped.csv) "
            f"say '{UNREAD_IMAGE}' (studies with no readable image: 0.25 for each class)"
        )
    record.claim(out / "submission.csv")
    path = write_submission(sub.loc[list(sample["id"])].reset_index(), out / "submission.csv", sample=source / SAMPLE_SUBMISSION)
    LOGGER.info(f"predict: {path}")
    return path


def fuse_config(bundle, prepared: Prepared, det: list[Path], cls: list[Path], sample: Path, out: Path, cfg: Config) -> Config:
    """`fuse split=test` of the members' tables (in the bundle's member order) with the bundle's fusion settings."""
    params = {k: v for k, v in bundle.fusion.items() if k in set(fusion_keys())}
    fixed = {"data": str(prepared.root), "split": "test", "sample": str(sample), "project": str(out), "name": FUSE_DIR}
    fixed |= {"overwrite": cfg.overwrite, "workers": pool_workers(cfg.workers)}
    members = {"det": [str(p) for p in det], "cls": [str(p) for p in cls if p.name != NONE_TABLE]}
    members["none_cls"] = [str(p) for p in cls if p.name == NONE_TABLE]  # the none models' tables, in their order
    return stage_config("fuse", None, {**params, **fixed, **members})


def run_fuse(fuse_cfg: Config) -> dict:
    from siimcovid.fuse.stage import fuse

    return fuse(fuse_cfg)


def write_view(prepared: Prepared, fused: dict, out: Path, record: Record) -> dict:
    from siimcovid.predict.view import write_view as view

    return view(prepared.root, fused["dir"], out, record=record)


def write_dicom(bundle, cfg: Config, out: Path, record: Record) -> Path | None:
    """dicom=: the DICOM results of the tables the view wrote (siimcovid.predict.dicom), listed in <out>/dicom.csv;
    without it, an earlier run's DICOM results are removed (they would no longer be this prediction's)."""
    from siimcovid.predict.dicom import write_results

    algorithm = {"version": __version__, "bundle": Path(cfg.bundle).name, "bundle_sha256": bundle.manifest_sha256}
    kinds, max_pixels = tuple(cfg.dicom or ()), input_checks(cfg).get("max_pixels")
    return write_results(out, record, kinds, algorithm, cfg.dicom_min_conf, max_pixels)


def fixed_outputs() -> list[str]:
    """The files predict writes in <out> whatever the images (the pictures' names come with the images)."""
    from siimcovid.predict.dicom import DICOM_CSV
    from siimcovid.predict.view import PAGE_FILES

    return ["submission.csv", SAMPLE_SUBMISSION, SKIPPED_CSV, *PAGE_FILES, DICOM_CSV]


def earlier_outputs(out: Path) -> Earlier | None:
    """A folder the release before the outputs rule left (outputs.Earlier), known by its predict.yaml: bundle_sha256,
    settings and members, but not the record's first line. predict's files there become its own: the fixed outputs,
    the member tables, a picture of every image prepared there, the sample submission it kept in fuse/."""
    from siimcovid.predict.view import PICTURES

    old = read_mapping(out / RECORD)
    if old is None or not {"bundle_sha256", "settings", "members"} <= set(old):
        return None
    pictures = [f"{PICTURES}/{p.stem}.jpg" for p in (out / "prepared").glob("*/images/test/*")]
    names = [*fixed_outputs(), f"{FUSE_DIR}/{SAMPLE_SUBMISSION}", *pictures]
    tables = ("detect/*/pred_test.csv", "classify/*/pred_test_image.csv", "classify/*/pred_test_study.csv")
    return Earlier(present(out, names, tables), old)


def predict(cfg: Config) -> dict:
    """Run the steps (module docstring). Returns {"out", "prepared", "submission" (SIIM source, else None),
    "fused" (fuse's result), "view" (the files written), "dicom" (dicom.csv with dicom=, else None), "skipped" (path or
    None), "seconds", "n_images"}."""
    offline()
    bundle, source, layout, out = check_inputs(cfg)
    hw = hardware(cfg)
    check_engines(bundle, hw, cfg.bundle)
    created = not out.exists()
    fixed = [out / name for name in fixed_outputs()]  # a user's file in the way stops it now, not at the end
    open_out(out, RECORD, "predict", cfg.overwrite, [source], earlier=earlier_outputs, check=fixed)  # the record first
    record = Record(out, cfg.bundle, bundle.manifest_sha256, dict(cfg))
    record.save()
    record.remove(out / FUSE_DIR / SAMPLE_SUBMISSION)  # where the release before the outputs rule kept it
    steps = Steps(record)
    try:
        prepared = steps.run("prepare", prepare_source, bundle, cfg, source, layout, out)
    except BaseException as e:
        if created and not any(p.suffix in (".png", ".jpg") for p in (out / "prepared").rglob("*")):
            show_skipped(out / "prepared" / SKIPPED_CSV)  # the reasons, before the folder that holds them goes
            shutil.rmtree(out, ignore_errors=True)  # nothing was converted: leave no folder that looks like a result
            if isinstance(e, NothingReadable):  # its skipped.csv went with the folder: the list is the warning above
                raise SiimError(f"no readable image in {e.root}: all {e.count} files skipped (listed above)") from None
        raise
    skipped = list_skipped(prepared, out, record)
    n_images = record.data["n_images"] = len(prepared.split("test"))
    lungs = lung_tables(bundle, prepared, hw, cfg, out, record, steps)  # crop=lung: the lung boxes, before the members
    run_plan(bundle, prepared, hw, cfg, lungs, out, record)  # the projection (and budget=) before the long work
    det = [steps.run(f"detect/{m.name}", member_table, m, prepared, hw, cfg, out, record, lungs) for m in bundle.detectors]
    cls = [steps.run(f"classify/{m.name}", member_table, m, prepared, hw, cfg, out, record, lungs) for m in bundle.classifiers]
    sample = sample_for(layout, source, prepared, out, record)
    fuse_cfg = fuse_config(bundle, prepared, det, cls, sample, out, cfg)
    fused = steps.run("fuse", run_fuse, fuse_cfg)
    submission = complete_submission(fused, source, out, record) if layout == "siim" else None
    view = steps.run("view", write_view, prepared, fused, out, record)
    dicom = steps.run("dicom", write_dicom, bundle, cfg, out, record) if cfg.dicom else write_dicom(bundle, cfg, out, record)
    log_seconds(record.data["seconds"], n_images)
    if skipped is not None:
        LOGGER.warning(f"WARNING: predict: {len(prepared.skipped())} file(s) skipped, listed in {skipped}")
    return {
        "out": out,
        "prepared": prepared.root,
        "submission": submission,
        "fused": fused,
        "view": view,
        "dicom": dicom,
        "skipped": skipped,
        "seconds": dict(record.data["seconds"]),
        "n_images": n_images,
    }


def log_seconds(seconds: dict, n_images: int) -> None:
    lines = [f"  {step:<28} {s:8.2f} s  {s / max(n_images, 1):.4f} s/image" for step, s in seconds.items()]
    LOGGER.info(f"predict: {n_images} images, time per step:\n" + "\n".join(lines))


def main(cfg: Config) -> dict:
    return predict(cfg)

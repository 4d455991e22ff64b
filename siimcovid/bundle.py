"""`siimcovid export`: a trained pipeline packed into one portable bundle; `open_bundle` reads one back, checked.

    siimcovid export run=demo                               # runs/run/demo's models and fusion -> runs/bundle/demo
    siimcovid export run=demo out=demo.zip half=true        # one zip file, the classifiers' weights in fp16
    siimcovid export detect=runs/detect/v5m,runs/detect/v5x classify=runs/classify/b3,runs/classify/b5 \\
        fuse=runs/fuse/ens out=ens.zip                      # runs named one by one: an ensemble bundle

A bundle is a folder (out=x.zip: the same tree in one stored zip file):

    manifest.yaml                 format, siimcovid version, created (UTC), sources, package versions, half,
                                  files: {relative path: {sha256, bytes}} of every other file
    prepare.yaml                  the conversion the models were trained on: sizes (those the members read), ext, png_level
    fuse.yaml                     the fusion settings of the run's submission (every fusion key) and the member
                                  order: det: [names], cls: [names] (fusion weights follow it)
    detect/<name>/settings.yaml   size (prepared side it reads), imgsz {fold: int}, conf, iou, tta, max_det,
                                  predict_imgsz, weights (and `ultralytics`: other predict arguments the run gave)
    detect/<name>/fold<k>.pt      the Ultralytics checkpoint as training left it (stripped: EMA weights, fp16)
    classify/<name>/settings.yaml imgsz, tta, weights
    classify/<name>/fold<k>.pt    {model_cfg, model, folds_id}: the weights load_checkpoint_model evaluates (EMA)

Only finished folds are packed (the predict stages' rules). The bundle is built in a temporary
folder beside `out` and renamed at the end (a zip: a temporary file, renamed): an `out` that exists
is complete. `open_bundle` checks everything before any work: the manifest, the format, the package
versions (another major version of torch, Ultralytics or timm is an error), every file's checksum,
no file unlisted, every member with folds; a zip is tested and extracted once into a cache folder
named by its sha256 (~/.cache/siimcovid/bundles/<sha256>, or $SIIMCOVID_CACHE/<sha256>).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from siimcovid import __version__, stages
from siimcovid.config import Config, load_config, read_yaml
from siimcovid.rundir import saved_predict_settings
from siimcovid.utils import LOGGER, SiimError, atomic_path, atomic_write_text, temp_dir_beside

FORMAT = 1  # the bundle format this siimcovid writes and reads
MANIFEST = "manifest.yaml"
PACKAGES = ("torch", "torchvision", "ultralytics", "timm", "ensemble_boxes", "pydicom", "numpy", "pandas")
MAJOR_CHECKED = ("torch", "ultralytics", "timm")  # another major version may not load (or run) the checkpoints
CONVERSION_KEYS = ("ext", "png_level")  # prepare's settings that change the pixels a model sees (besides the size)
CACHE_ENV = "SIIMCOVID_CACHE"
KINDS = {"detect": "det", "classify": "cls"}  # member kind -> its list in fuse.yaml


@dataclass
class Member:
    """One model of a bundle: kind "detect" | "classify", name (the `model` column of its predictions: fusion
    weights key on it), weights {fold: checkpoint file}, settings (its settings.yaml)."""

    kind: str
    name: str
    weights: dict[int, Path]
    settings: dict


@dataclass
class Bundle:
    """An opened, checked bundle: members in fuse.yaml's order."""

    root: Path
    manifest: dict
    prepare: dict
    fusion: dict
    detectors: list[Member] = field(default_factory=list)
    classifiers: list[Member] = field(default_factory=list)


# ----------------------------------------------------------------------------- small shared pieces
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Python and the packages a bundle's models need, as installed here (None: not installed)."""
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def major(version: str) -> str:
    return str(version).split(".")[0]


def write_yaml(path: Path, data: dict) -> Path:
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def locate(text: str | Path, anchors: list[Path]) -> Path | None:
    """A path a run recorded (maybe relative to the folder the run was started in): as given, else under an anchor."""
    path = Path(text)
    for cand in [path] + ([] if path.is_absolute() else [a / path for a in anchors]):
        if cand.exists():
            return cand
    return None


# ----------------------------------------------------------------------------- export: what to pack
@dataclass
class Sources:
    """The run folders an export packs and the settings their predictions were made with."""

    name: str
    detect: list[Path]
    classify: list[Path]
    fuse: Path | None  # a fuse run folder or a YAML file; None: cfg/fuse.yaml's defaults
    run: dict  # run.yaml of a `siimcovid run` ({} when the runs are named one by one)
    anchors: list[Path]  # folders a relative path of a run's settings may be relative to


def export_sources(cfg: Config) -> Sources:
    project = Path(cfg.project)
    anchors = [project.resolve().parent, project]
    if cfg.run:
        if cfg.detect or cfg.classify or cfg.fuse:
            raise SiimError("export: give run=<name>, or detect=/classify=/fuse= one by one, not both")
        run_yaml = project / stages.stage("run").folder / cfg.run / "run.yaml"
        if not run_yaml.is_file():
            raise SiimError(f"export: {run_yaml} not found: run=<name> names a `siimcovid run` under project={project}")
        folder = lambda stage: project / stages.stage(stage).folder / cfg.run  # noqa: E731
        fuse = folder("fuse") / "fuse_test.yaml"
        if not fuse.is_file():
            raise SiimError(f"export: {fuse} not found: run {cfg.run} has not written its submission (finish `siimcovid run`)")
        return Sources(cfg.run, [folder("detect")], [folder("classify")], fuse, read_yaml(run_yaml), anchors)
    if not cfg.detect and not cfg.classify:
        raise SiimError("export: give run=<a siimcovid run's name>, or the run folders: detect=<dir>[,...] classify=<dir>[,...]")
    detect, classify = [Path(d) for d in cfg.detect], [Path(d) for d in cfg.classify]
    fuse = Path(cfg.fuse) if cfg.fuse else None
    name = (fuse if fuse is None or fuse.is_dir() else fuse.parent).name if fuse else "+".join(p.name for p in detect + classify)
    return Sources(name, detect, classify, fuse, {}, anchors)


def predict_config(stage: str, src: Sources, weights: str | None) -> Config:
    """The `<stage> predict` settings the run's predictions were made with: run.yaml's `<stage>_predict` section
    over cfg/<stage>.yaml (the runtime settings `run` adds from the train section change no prediction);
    runs named one by one saved none, so cfg/<stage>.yaml's defaults."""
    settings = dict(src.run.get(f"{stage}_predict") or {})
    if weights:
        settings["weights"] = weights
    return stages.stage_config(stage, "predict", settings)


def detector_member(run_dir: Path, pcfg: Config, explicit: str | None = None) -> tuple[Member, Path]:
    """A finished detect run -> its Member (source checkpoints) and the prepared folder it trained on."""
    from siimcovid.detect.common import passthrough
    from siimcovid.detect.predict import PREDICT_KEYS, load_run

    saved = saved_predict_settings(run_dir)  # what made its own pred_test.csv, when its predict recorded it
    weights = explicit or saved.get("weights", pcfg.weights)
    run = load_run(run_dir, weights)  # refuses folds still training
    chosen = {k: saved.get(k, pcfg[k]) for k in PREDICT_KEYS}
    settings = {"size": run.size, "imgsz": dict(run.imgsz), **chosen, "weights": weights}
    extra = saved.get("ultralytics", {}) if saved else passthrough(pcfg)  # Ultralytics arguments the run gave (agnostic_nms...)
    if extra:
        settings["ultralytics"] = extra
    return Member("detect", run.name, dict(run.weights), settings), run.prepared.root


def classifier_member(run_dir: Path, pcfg: Config, anchors: list[Path], explicit: str | None = None) -> tuple[Member, Path]:
    """A finished classify run -> its Member (source checkpoints) and the prepared folder it trained on."""
    from siimcovid.classify.predict import fold_checkpoints

    saved = run_dir / "classify.yaml"
    if not saved.is_file():
        raise SiimError(f"export: {run_dir} is not a classify run (no classify.yaml)")
    run_cfg = read_yaml(saved)
    saved = saved_predict_settings(run_dir)  # what made its own pred_test tables, when its predict recorded it
    chosen = explicit or saved.get("weights", pcfg.weights)
    weights = fold_checkpoints(run_dir, False, chosen)  # refuses folds still training
    prepared = locate(run_cfg["data"], [*anchors, *run_dir.resolve().parents])
    if prepared is None:
        raise SiimError(f"export: {saved}: its prepared folder {run_cfg['data']} is not found")
    settings = {"imgsz": int(run_cfg["imgsz"]), "tta": saved.get("tta", pcfg.tta), "weights": chosen}
    return Member("classify", run_dir.name, weights, settings), prepared


def check_names(members: list[Member]) -> None:
    names = [m.name for m in members]
    if len(set(names)) < len(names):
        raise SiimError(f"export: two {members[0].kind} runs share a name {names}: fusion tells members apart by name")


# ----------------------------------------------------------------------------- export: fusion and conversion
def file_models(text: str, anchors: list[Path]) -> list[str]:
    """The `model` names of one prediction file fusion read, in order of appearance; when the file is gone, the name
    its writer gives it (detect and classify predict write <run dir>/pred_*.csv with model = the run's name)."""
    path = locate(text, anchors)
    if path is None or not path.is_file():
        return [Path(text).parent.name]
    return list(dict.fromkeys(pd.read_csv(path, usecols=["model"], dtype=str)["model"]))


def member_order(files: list[str], members: list[Member], anchors: list[Path], key: str, fuse: Path) -> list[list[str]]:
    """The member names of each file the fusion read, checked against the members exported."""
    per_file = [file_models(f, anchors) for f in files]
    names = [n for names in per_file for n in names]
    if key == "cls" and any(len(n) > 1 or "+" in n[0] for n in per_file):
        raise SiimError(f"export: {fuse} fused a classifier file of several models {per_file}: fuse each run's own table")
    if sorted(names) != sorted(m.name for m in members):
        given = [m.name for m in members]
        raise SiimError(f"export: {fuse} fused {key} models {names}, but the runs exported are {given}")
    return per_file


def fusion_file(fuse: Path) -> Path:
    """A fuse run folder -> the settings of its submission (fuse_test.yaml), else its tuned best.yaml."""
    if not fuse.exists():
        raise SiimError(f"export: fuse={fuse} not found")
    if fuse.is_file():
        return fuse
    for name in ("fuse_test.yaml", "best.yaml"):
        if (fuse / name).is_file():
            return fuse / name
    raise SiimError(f"export: {fuse} holds neither fuse_test.yaml nor best.yaml (fuse=<a fuse run folder or a YAML file>)")


def fused_files(cfg: Config, path: Path) -> tuple[list, list]:
    """The det and cls files the fusion settings were made for, in their order: the settings file's own lists, or, for
    a tuned best.yaml (which has none), those of the tuning beside it (tune.yaml): list weights follow that order."""
    if cfg.det or cfg.cls or path.name != "best.yaml":
        return list(cfg.det), list(cfg.cls)
    tuned = read_yaml(path.parent / "tune.yaml") if (path.parent / "tune.yaml").is_file() else {}
    return list(tuned.get("det") or []), list(tuned.get("cls") or [])


def fusion_settings(src: Sources, det: list[Member], cls: list[Member]) -> dict:
    """fuse.yaml of the bundle: every fusion parameter and the member order (det, cls) of the fusion that made the
    submission; per-file det_weights become per-model ones when one file held several models."""
    from siimcovid.fuse.pipeline import FUSION_KEYS

    if src.fuse is None:
        LOGGER.warning("export: no fuse= given: the bundle fuses with cfg/fuse.yaml's defaults, members in the order given")
        cfg = load_config("fuse", {})
    else:
        path = fusion_file(src.fuse)
        cfg = load_config("fuse", {"cfg": str(path)})
        LOGGER.info(f"export: fusion settings from {path}")
    out = {k: cfg[k] for k in FUSION_KEYS}
    det_names, cls_names = [m.name for m in det], [m.name for m in cls]
    det_list, cls_list = fused_files(cfg, path) if src.fuse is not None else ([], [])
    if det_list or cls_list:  # a fuse run's saved settings: its files give the member order
        anchors = [*src.anchors, *Path(src.fuse).resolve().parents]
        det_files = member_order(det_list, det, anchors, "det", src.fuse)
        cls_files = member_order(cls_list, cls, anchors, "cls", src.fuse)
        det_names, cls_names = [n for f in det_files for n in f], [f[0] for f in cls_files]
        if isinstance(out["det_weights"], list) and out["det_weights"] and any(len(f) > 1 for f in det_files):
            out["det_weights"] = {n: w for w, names in zip(out["det_weights"], det_files) for n in names}
    for key, names in (("det_weights", det_names), ("cls_weights", cls_names)):
        if isinstance(out[key], list) and out[key] and len(out[key]) != len(names):
            raise SiimError(f"export: the fusion's {key}={out[key]} do not match its {len(names)} members {names}")
    return {**out, "det": det_names, "cls": cls_names}


def prepare_settings(prepared: list[Path], sizes: list[int]) -> dict:
    """prepare.yaml of the bundle: the sizes the members read and the conversion of the folders they trained on."""
    from siimcovid.data.prepared import Prepared

    conversions = {str(p): {k: Prepared.read_cfg(p).get(k) for k in CONVERSION_KEYS} for p in dict.fromkeys(prepared)}
    if len({tuple(c.values()) for c in conversions.values()}) > 1:
        raise SiimError(f"export: the members trained on images converted differently, {conversions}: one bundle holds one")
    return {"sizes": sorted(set(sizes)), **next(iter(conversions.values()))}


def ordered(members: list[Member], names: list[str]) -> list[Member]:
    by_name = {m.name: m for m in members}
    return [by_name[n] for n in names]


# ----------------------------------------------------------------------------- export: writing
def pack_classifier(src: Path, dst: Path, half: bool) -> str:
    """A classify checkpoint -> {model_cfg, model, folds_id}: the weights load_checkpoint_model evaluates (the EMA of a
    last.pt), no optimizer state; half: floating tensors in fp16. Returns the weights' dtype."""
    import torch

    from siimcovid.classify.predict import checkpoint_folds_id, load_checkpoint_model

    model, ckpt = load_checkpoint_model(src, torch.device("cpu"))
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(dst) as tmp:
        torch.save({"model_cfg": ckpt["model_cfg"], "model": state, "folds_id": checkpoint_folds_id(src, ckpt)}, tmp)
    return "float16" if half else str(next(iter(model.parameters())).dtype).replace("torch.", "")


def pack_detector(src: Path, dst: Path, half: bool) -> str:
    """An Ultralytics checkpoint, copied (Ultralytics stripped it at the end of training: EMA weights in fp16);
    one holding fp32 weights is stripped into fp16 by Ultralytics itself when half. Returns the weights' dtype."""
    from ultralytics.utils.patches import torch_load

    model = torch_load(src, map_location="cpu").get("model")
    dtype = str(next(iter(model.parameters())).dtype).replace("torch.", "") if model is not None else "unknown"
    if half and dtype == "float32":
        from ultralytics.utils.torch_utils import strip_optimizer

        strip_optimizer(src, s=str(dst))
        return "float16"
    shutil.copyfile(src, dst)
    return dtype


def write_members(root: Path, members: list[Member], half: bool) -> dict[str, str]:
    """settings.yaml and fold<k>.pt of every member under root/<kind>/<name>/; {"<kind>/<name>": weights dtype}."""
    dtypes = {}
    jobs = [(m, k, p) for m in members for k, p in sorted(m.weights.items())]
    for m, k, src in tqdm(jobs, desc="export", unit="checkpoint"):
        folder = root / m.kind / m.name
        folder.mkdir(parents=True, exist_ok=True)
        pack = pack_detector if m.kind == "detect" else pack_classifier
        dtypes[f"{m.kind}/{m.name}"] = pack(src, folder / f"fold{k}.pt", half)
    for m in members:
        write_yaml(root / m.kind / m.name / "settings.yaml", m.settings)
    return dtypes


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root but the manifest."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST)
    return {p.relative_to(root).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files}


def manifest(root: Path, sources: dict, half: bool, dtypes: dict) -> dict:
    return {
        "format": FORMAT,
        "siimcovid": __version__,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "sources": sources,
        "versions": package_versions(),
        "half": half,
        "dtypes": dtypes,
        "files": file_table(root),
    }


def source_record(src: Sources, members: list[Member], prepared: list[Path]) -> dict:
    """Where a bundle came from: the run, each member's run folder, the fusion file, the prepared folders."""
    dirs = {f"{m.kind}/{m.name}": str(Path(d).resolve()) for m, d in zip(members, src.detect + src.classify)}
    return {
        "run": src.name if src.run else None,
        "members": dirs,
        "fuse": str(Path(src.fuse).resolve()) if src.fuse else None,
        "prepared": sorted({str(Path(p).resolve()) for p in prepared}),
    }


def zip_tree(root: Path, out: Path) -> None:
    """The tree of root into one stored zip at out (a temporary file, renamed)."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(root).as_posix())


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tree tmp to out; an existing out (overwrite=true) is moved aside first, then removed."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise SiimError(f"export: {out} exists: choose another out= or give overwrite=true")
    if out.exists() and (out.suffix == ".zip") != out.is_file():
        raise SiimError(f"export: {out} exists and is a {'file' if out.is_file() else 'folder'}: not replacing it")


def export(cfg: Config) -> Path:
    """`siimcovid export`: pack the run(s) into a bundle folder or zip; returns its path."""
    src = export_sources(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.project) / stages.stage("export").folder / src.name
    check_out(out, cfg.overwrite)
    det_cfg, cls_cfg = predict_config("detect", src, cfg.weights), predict_config("classify", src, cfg.weights)
    unsaved = [d for d in src.detect + src.classify if not saved_predict_settings(d)]
    if unsaved and not src.run:
        from siimcovid.detect.predict import PREDICT_KEYS

        shown = " ".join(f"{k}={det_cfg[k]}" for k in PREDICT_KEYS)
        LOGGER.info(
            f"export: {', '.join(map(str, unsaved))} saved no predict settings (predicted before siimcovid recorded them): "
            f"the defaults, detect {shown}, classify tta={cls_cfg.tta}"
        )
    det = [detector_member(d, det_cfg, cfg.weights) for d in src.detect]
    cls = [classifier_member(d, cls_cfg, src.anchors, cfg.weights) for d in src.classify]
    members = [m for m, _ in det + cls]
    for group in ([m for m, _ in det], [m for m, _ in cls]):
        if group:
            check_names(group)
    fusion = fusion_settings(src, [m for m, _ in det], [m for m, _ in cls])
    prepared = [p for _, p in det + cls]
    sizes = [m.settings["size"] for m, _ in det] + [m.settings["imgsz"] for m, _ in cls]
    record = source_record(src, members, prepared)
    members = ordered([m for m, _ in det], fusion["det"]) + ordered([m for m, _ in cls], fusion["cls"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        write_yaml(tmp / "prepare.yaml", prepare_settings(prepared, sizes))
        write_yaml(tmp / "fuse.yaml", fusion)
        dtypes = write_members(tmp, members, cfg.half)
        write_yaml(tmp / MANIFEST, manifest(tmp, record, cfg.half, dtypes))  # last: it lists every file
        if out.suffix == ".zip":
            zip_tree(tmp, out)
        else:
            move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = out.stat().st_size if out.is_file() else sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    LOGGER.info(f"export: {out} ({size / 1e6:.1f} MB; {len(members)} models, dtypes {dtypes})")
    return out


def main(cfg: Config) -> Path:
    return export(cfg)


# ----------------------------------------------------------------------------- open_bundle: checks, then members
def cache_dir() -> Path:
    """Where zip bundles are extracted: $SIIMCOVID_CACHE, else ~/.cache/siimcovid/bundles."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "siimcovid" / "bundles"


def zip_root(names: list[str]) -> str:
    """The folder of the zip that holds manifest.yaml: '' (the top), or its one top folder (a zipped bundle folder)."""
    if MANIFEST in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
        return next(iter(tops)) + "/"
    return None


def extract_zip(path: Path) -> Path:
    """A zip bundle, tested (CRCs), extracted once into <cache>/<its sha256>/; that folder's bundle root."""
    cache = cache_dir() / sha256(path)
    if not cache.is_dir():
        try:
            zf = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise SiimError(f"bundle {path}: neither a bundle folder nor a zip file") from None
        with zf:
            names = zf.namelist()
            if any(n.startswith("/") or ".." in Path(n).parts for n in names):
                raise SiimError(f"bundle {path}: holds a path outside the bundle: not extracting it")
            if zip_root(names) is None:
                raise SiimError(f"bundle {path}: not a siimcovid bundle ({MANIFEST} missing)")
            bad = zf.testzip()
            if bad is not None:
                raise SiimError(f"bundle {path}: {bad} is corrupt (its CRC does not match the zip's)")
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_dir_beside(cache, suffix="")
            try:
                zf.extractall(tmp)
                with contextlib.suppress(OSError):  # another process extracted it meanwhile: keep theirs
                    os.rename(tmp, cache)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    names = [p.relative_to(cache).as_posix() for p in cache.rglob("*")]
    return cache / (zip_root(names) or "")


def read_manifest(root: Path, where: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise SiimError(f"bundle {where}: not a siimcovid bundle ({MANIFEST} missing)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SiimError(f"bundle {where}: {MANIFEST} is not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise SiimError(f"bundle {where}: {MANIFEST} is not a bundle manifest (no `files` table)")
    return data


def check_format(data: dict, where: Path) -> None:
    fmt = data.get("format")
    if not isinstance(fmt, int) or fmt < 1:
        raise SiimError(f"bundle {where}: {MANIFEST}: unknown bundle format {fmt!r} (this siimcovid reads format {FORMAT})")
    if fmt > FORMAT:
        raise SiimError(
            f"bundle {where}: {MANIFEST}: format {fmt} was written by a newer siimcovid ({data.get('siimcovid')}); "
            f"this one ({__version__}) reads format {FORMAT}: upgrade siimcovid"
        )


def check_versions(data: dict, where: Path) -> None:
    """Another major version of torch / Ultralytics / timm than the bundle's: an error; any other difference: a warning."""
    made, here = data.get("versions") or {}, package_versions()
    for name in MAJOR_CHECKED:
        if made.get(name) and not here.get(name):
            raise SiimError(f"bundle {where}: {MANIFEST}: made with {name} {made[name]}, which is not installed here")
        if made.get(name) and major(made[name]) != major(here[name]):
            raise SiimError(
                f"bundle {where}: {MANIFEST}: made with {name} {made[name]}, this environment has {name} {here[name]}: "
                f"another major version may not load its checkpoints; install {name}=={made[name]}"
            )
    differ = [f"{k} {v} (here {here.get(k)})" for k, v in made.items() if v and str(here.get(k)) != str(v)]
    if differ:
        LOGGER.warning(f"bundle {where}: made with other package versions: {', '.join(differ)}")


def check_files(root: Path, data: dict, where: Path) -> None:
    """Every listed file present, of its size and sha256; no file unlisted."""
    listed = data["files"]
    for rel, entry in tqdm(listed.items(), desc="check bundle", unit="file", leave=False):
        path = root / rel
        if not path.is_file():
            raise SiimError(f"bundle {where}: {rel} is missing (listed in {MANIFEST}): an incomplete copy?")
        if path.stat().st_size != entry.get("bytes") or sha256(path) != entry.get("sha256"):
            raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(listed))
    if extra:
        raise SiimError(f"bundle {where}: {extra[0]} is not listed in {MANIFEST} ({len(extra)} unlisted): not as exported")


def bundle_yaml(root: Path, rel: str, where: Path) -> dict:
    if not (root / rel).is_file():
        raise SiimError(f"bundle {where}: {rel} is missing")
    return read_yaml(root / rel)


def read_member(root: Path, kind: str, name: str, listed: dict, where: Path) -> Member:
    """One member of fuse.yaml's lists: its settings and its fold checkpoints (at least one)."""
    pattern = re.compile(rf"{re.escape(kind)}/{re.escape(str(name))}/fold(\d+)\.pt")
    weights = {int(m[1]): root / rel for rel in listed if (m := pattern.fullmatch(rel))}
    if not weights:
        raise SiimError(f"bundle {where}: {kind}/{name}/ has no fold<k>.pt: a member with no folds")
    settings = bundle_yaml(root, f"{kind}/{name}/settings.yaml", where)
    return Member(kind, str(name), dict(sorted(weights.items())), settings)


def read_members(root: Path, data: dict, fusion: dict, where: Path) -> dict[str, list[Member]]:
    """{kind: members in fuse.yaml's order}; a member folder fuse.yaml does not name is an error."""
    out = {}
    for kind, key in KINDS.items():
        names = list(fusion.get(key) or [])
        out[kind] = [read_member(root, kind, n, data["files"], where) for n in names]
        folders = {rel.split("/")[1] for rel in data["files"] if rel.startswith(f"{kind}/")}
        stray = sorted(folders - set(map(str, names)))
        if stray:
            raise SiimError(f"bundle {where}: {kind}/{stray[0]}/ is not a member of fuse.yaml's {key}: {names}")
    if not out["detect"] and not out["classify"]:
        raise SiimError(f"bundle {where}: fuse.yaml names no member (det: [], cls: [])")
    return out


def open_bundle(path: str | Path) -> Bundle:
    """A bundle folder or zip, every check done before any work (each a SiimError naming the bundle and the file)."""
    where = Path(path)
    if not where.exists():
        raise SiimError(f"bundle {where} not found")
    root = extract_zip(where) if where.is_file() else where
    data = read_manifest(root, where)
    check_format(data, where)
    check_versions(data, where)
    try:
        check_files(root, data, where)
    except SiimError as e:
        if root != where:  # the zip's sha256 matched: its extracted copy was changed since
            raise SiimError(f"{e} (in the extracted copy {root}: delete it to extract the zip again)") from None
        raise
    prepare = bundle_yaml(root, "prepare.yaml", where)
    fusion = bundle_yaml(root, "fuse.yaml", where)
    members = read_members(root, data, fusion, where)
    return Bundle(root, data, prepare, fusion, members["detect"], members["classify"])

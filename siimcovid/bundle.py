"""`siimcovid export`: a trained pipeline packed into one portable bundle; `open_bundle` reads one back, checked.

    siimcovid export run=demo                               # runs/run/demo's models and fusion -> runs/bundle/demo
    siimcovid export run=demo out=demo.zip half=true        # one zip file, the classifiers' weights in fp16
    siimcovid export detect=runs/detect/v5m,runs/detect/v5x classify=runs/classify/b3,runs/classify/b5 \\
        fuse=runs/fuse/ens out=ens.zip                      # runs named one by one: an ensemble bundle

A bundle is a folder (out=x.zip: the same tree in one stored zip file). Nothing in it is code: weights are
safetensors, every other file is YAML read with a safe loader, and each model is rebuilt from a checked,
data-only description (siimcovid.weights), so a bundle from a stranger cannot run anything when it is opened:

    manifest.yaml                  format, siimcovid version, created (UTC), sources (run and folder names, no
                                   absolute paths), package versions, half, dtypes,
                                   files: {relative path: {sha256, bytes}} of every other file
    signature.yaml                 (sign=<private key> only) an Ed25519 signature of every file (siimcovid.signing)
    prepare.yaml                   the conversion the models were trained on: sizes (those the members read), ext, png_level
    fuse.yaml                      the fusion settings of the run's submission (every fusion key) and the member
                                   order: det: [names], cls: [names] (fusion weights follow it)
    detect/<name>/model.yaml       the detector's description: its Ultralytics model YAML, class names (siimcovid.weights)
    detect/<name>/settings.yaml    size (prepared side it reads), imgsz {fold: int}, conf, iou, tta, max_det,
                                   predict_imgsz, weights (and `ultralytics`: agnostic_nms / classes, when the run gave them)
    detect/<name>/fold<k>.safetensors  the weights predict evaluates (Ultralytics' EMA, fp16 as training left them)
    classify/<name>/model.yaml     the classifier's description: timm name and build_model's arguments
    classify/<name>/settings.yaml  imgsz, tta, weights, folds_id {fold: the fold fingerprint it trained on}
    classify/<name>/fold<k>.safetensors  the weights load_checkpoint_model evaluates (EMA); fp16 with half=true

Only finished folds are packed (the predict stages' rules). The bundle is built in a temporary
folder beside `out` and renamed at the end (a zip: a temporary file, renamed): an `out` that exists
is complete. `open_bundle` checks everything before any work: the manifest, the format, the package
versions (another major version of torch, Ultralytics or timm is an error), the signature (trust=),
every file's checksum, regular files only, no file unlisted, every YAML (typed as the stages type
their settings), every description, every member with folds. A zip is checked against its manifest
entry by entry as it is extracted, once, into a cache folder named by its sha256
(~/.cache/siimcovid/bundles/<sha256>, or $SIIMCOVID_CACHE/<sha256>); nothing unlisted is written there.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import socket
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import yaml
from tqdm import tqdm

from siimcovid import __version__, outputs, signing, stages, weights
from siimcovid.config import Config, load_config, read_yaml, schema
from siimcovid.rundir import saved_predict_settings
from siimcovid.signing import SIGNATURE
from siimcovid.utils import (
    LOGGER,
    SiimError,
    atomic_path,
    atomic_write_text,
    file_sha256,
    name_problem,
    read_input,
    stream_sha256,
    temp_dir_beside,
)

FORMAT = 2  # the bundle format this siimcovid writes and reads (1: pickled checkpoints, no longer read)
MANIFEST = "manifest.yaml"
MAX_MANIFEST_BYTES = 4 << 20  # a manifest of 1,000 folds is ~200 KB
MAX_YAML_BYTES = 1 << 20  # every other YAML file of a bundle is a few KB
MAX_PATH = 1024  # bytes of a path a bundle lists (its longest real one: ~60)
MAX_DEPTH = 32  # nesting of a bundle's YAML (its deepest real one, a model YAML's layer arguments: 6)
MANIFEST_KEYS = ("format", "siimcovid", "created", "sources", "versions", "half", "dtypes", "files")
ULTRALYTICS_PREDICT = {"agnostic_nms": bool, "classes": list}  # Ultralytics predict arguments a bundle may carry
PACKAGES = ("torch", "torchvision", "ultralytics", "timm", "ensemble_boxes", "pydicom", "numpy", "pandas")
MAJOR_CHECKED = ("torch", "ultralytics", "timm")  # another major version may not load (or run) the checkpoints
CONVERSION_KEYS = ("ext", "png_level")  # prepare's settings that change the pixels a model sees (besides the size)
CACHE_ENV = "SIIMCOVID_CACHE"
KINDS = {"detect": "det", "classify": "cls"}  # member kind -> its list in fuse.yaml
TOP_FILES = ("prepare.yaml", "fuse.yaml")  # besides the manifest and the signature; each member: member_files


@dataclass
class Member:
    """One model of a bundle: kind "detect" | "classify", name (the `model` column of its predictions: fusion
    weights key on it), weights {fold: weights file}, settings (its settings.yaml), model (its description:
    siimcovid.weights; export fills it in as it packs the folds)."""

    kind: str
    name: str
    weights: dict[int, Path]
    settings: dict
    model: dict = field(default_factory=dict)
    digests: dict[int, str] = field(default_factory=dict)  # {fold: sha256 of its weights file}: checked when loaded


@dataclass
class Bundle:
    """An opened, checked bundle: members in fuse.yaml's order."""

    root: Path
    manifest: dict
    prepare: dict
    fusion: dict
    manifest_sha256: str  # of the manifest's bytes open_bundle checked: what identifies the bundle
    detectors: list[Member] = field(default_factory=list)
    classifiers: list[Member] = field(default_factory=list)


# ----------------------------------------------------------------------------- small shared pieces
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


class PlainDumper(yaml.SafeDumper):
    """A bundle's YAML is written without anchors and aliases (the reader refuses them: see parse_yaml)."""

    def ignore_aliases(self, data) -> bool:
        return True


def write_yaml(path: Path, data: dict) -> Path:
    return atomic_write_text(path, yaml.dump(data, Dumper=PlainDumper, sort_keys=False, allow_unicode=True))


def parse_yaml(data: bytes, rel: str, where, limit: int = MAX_YAML_BYTES) -> dict:
    """A bundle file's bytes -> its mapping: safe YAML (libyaml's parser where installed), no anchors or aliases (a
    few bytes of nested aliases expand into billions of items when walked), a size limit, a bounded depth."""
    if len(data) > limit:
        raise SiimError(f"bundle {where}: {rel} is {len(data)} bytes (a bundle's {rel} is at most {limit})")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        text = data.decode("utf-8")
        depth = 0
        for event in yaml.parse(text, Loader=loader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise SiimError(f"bundle {where}: {rel} is not valid YAML (an anchor or alias: a bundle's YAML has none)")
            depth += isinstance(event, yaml.CollectionStartEvent) - isinstance(event, yaml.CollectionEndEvent)
            if depth > MAX_DEPTH:
                raise SiimError(f"bundle {where}: {rel} nests deeper than {MAX_DEPTH} levels (a bundle's YAML is flat)")
        out = yaml.load(text, Loader=loader)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise SiimError(f"bundle {where}: {rel} is not valid YAML ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(out, dict):
        raise SiimError(f"bundle {where}: {rel} is not a mapping of key: value")
    return out


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
    dropped = sorted(set(extra) - set(ULTRALYTICS_PREDICT))
    if dropped:
        LOGGER.warning(f"export: {run_dir}: its predict's Ultralytics arguments {dropped} do not travel (a bundle carries "
                       f"{sorted(ULTRALYTICS_PREDICT)}, which change the boxes)")  # fmt: skip
    extra = {k: v for k, v in extra.items() if k in ULTRALYTICS_PREDICT}
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
    from siimcovid.tables import read_csv

    path = locate(text, anchors)
    if path is None or not path.is_file():
        return [Path(text).parent.name]
    return list(dict.fromkeys(read_csv(path, ["model"], text=["model"])["model"]))  # one line if the file is bad


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
def pack_classifier(src: Path, dst: Path, half: bool) -> tuple[str, dict, str | None]:
    """A classify checkpoint of a run (the user's own: a pickle is read here, never from a bundle) -> the weights
    load_checkpoint_model evaluates (the EMA of a last.pt) as safetensors at dst (half: fp16).
    Returns (the weights' dtype, the model's description, the fold fingerprint it trained on)."""
    import torch

    from siimcovid.classify.predict import checkpoint_folds_id, load_checkpoint_model

    model, ckpt = load_checkpoint_model(src, torch.device("cpu"))
    dtype = weights.save_state(model.state_dict(), dst, half)
    return dtype, weights.classifier_description(ckpt["model_cfg"]), checkpoint_folds_id(src, ckpt)


def pack_detector(src: Path, dst: Path, half: bool) -> tuple[str, dict, None]:
    """An Ultralytics checkpoint of a run -> the weights YOLO() predicts with (its EMA, else its model: fp16 when
    training finished) as safetensors at dst (half: fp32 ones in fp16). Returns (dtype, description, None)."""
    from ultralytics.utils.patches import torch_load

    ckpt = torch_load(src, map_location="cpu")
    model = ckpt.get("ema") or ckpt.get("model") if isinstance(ckpt, dict) else None
    if model is None or not hasattr(model, "yaml"):
        raise SiimError(f"export: {src} is not an Ultralytics detection checkpoint (no model)")
    single_cls = bool((ckpt.get("train_args") or {}).get("single_cls"))
    return weights.save_state(model.state_dict(), dst, half), weights.detector_description(model, single_cls), None


def write_members(root: Path, members: list[Member], half: bool) -> dict[str, str]:
    """model.yaml, settings.yaml and fold<k>.safetensors of every member under root/<kind>/<name>/;
    returns {"<kind>/<name>": weights dtype}. The folds of a member share one description (one architecture)."""
    dtypes = {}
    jobs = [(m, k, p) for m in members for k, p in sorted(m.weights.items())]
    folds_id: dict[str, dict[int, str]] = {}
    for m, k, src in tqdm(jobs, desc="export", unit="checkpoint"):
        key = f"{m.kind}/{m.name}"
        pack = pack_detector if m.kind == "detect" else pack_classifier
        dtypes[key], desc, fold_id = pack(src, root / key / f"fold{k}{weights.SUFFIX}", half)
        if m.model and desc != m.model:
            raise SiimError(f"export: {src}: fold {k} of {key} has another architecture than its other folds")
        m.model = desc
        if fold_id:
            folds_id.setdefault(key, {})[k] = fold_id
    for m in members:
        key = f"{m.kind}/{m.name}"
        weights.check_description(m.model, m.kind, f"export: {key}/{weights.DESCRIPTION}")  # predict will read it so
        write_yaml(root / key / weights.DESCRIPTION, m.model)
        write_yaml(root / key / "settings.yaml", {**m.settings, **({"folds_id": folds_id[key]} if key in folds_id else {})})
    return dtypes


def manifest_files(root: Path) -> list[str]:
    """The relative paths of every file under root that the manifest lists: all but itself and the signature."""
    files = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in files if rel not in (MANIFEST, SIGNATURE))


def file_table(root: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every file under root but the manifest and the signature."""
    return {rel: {"sha256": file_sha256(root / rel), "bytes": (root / rel).stat().st_size} for rel in manifest_files(root)}


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


def portable(path: str | Path, project: Path) -> str:
    """A folder as the manifest records it: relative to the project when inside it, else its own name (the
    manifest travels: it keeps no absolute path of the machine that made it)."""
    path, project = Path(path).resolve(), Path(project).resolve()
    return path.relative_to(project).as_posix() if path.is_relative_to(project) else path.name


def source_record(src: Sources, members: list[Member], prepared: list[Path], project: Path) -> dict:
    """Where a bundle came from: the run, each member's run folder, the fusion file, the prepared folders."""
    dirs = {f"{m.kind}/{m.name}": portable(d, project) for m, d in zip(members, src.detect + src.classify)}
    return {
        "run": src.name if src.run else None,
        "members": dirs,
        "fuse": portable(src.fuse, project) if src.fuse else None,
        "prepared": sorted({portable(p, project) for p in prepared}),
    }


def zip_tree(root: Path, out: Path) -> None:
    """The tree of root into one stored zip at out (a temporary file, renamed)."""
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(root).as_posix())


def move_into_place(tmp: Path, out: Path, work: Path) -> None:
    """Rename the finished tree (or zip) tmp to out; an existing out (overwrite=true) is moved aside into the work
    folder first, and goes with it."""
    if out.exists():
        os.replace(out, work / "old")
    os.replace(tmp, out)


WORK_MARK = ".siimcovid-export"  # in an export's work folder: the host and process building it


def work_folder(out: Path) -> Path:
    """A new work folder beside out (the bundle is built in it, then renamed to out), marked as this export's; the
    work folders of exports killed before their end (their process is gone) are removed first."""
    host = socket.gethostname()
    for folder in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        mark = folder / WORK_MARK
        if folder.is_dir() and not folder.is_symlink() and mark.is_file():
            made_by, _, pid = mark.read_text().partition(" ")
            if made_by == host and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
    work = temp_dir_beside(out)
    (work / WORK_MARK).write_text(f"{host} {os.getpid()}")
    return work


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def is_bundle(path: Path) -> bool:
    """Whether an existing path is a bundle as export leaves one (a folder holding nothing but a manifest's files,
    all whole; or a zip whose entries its manifest lists): the only thing export replaces. A folder that merely
    holds a file named manifest.yaml, or a bundle a user added notes to, is not."""
    try:
        if path.is_dir():
            header = read_header(path, path)
            check_files(path, header.manifest, path)
        else:
            with zipfile.ZipFile(path) as zf:
                zip_entries(zf, path)
    except (SiimError, zipfile.BadZipFile, OSError):
        return False
    return True


def check_out(out: Path, overwrite: bool, sources: list) -> None:
    """out= is new, or (overwrite=true) a bundle of the same kind; never the root, the home folder or a folder that
    holds the runs being exported (replacing it would delete them)."""
    if out.suffix == ".zip" and not out.is_dir():
        if any(Path(s).resolve() == out.resolve() for s in sources if s):
            raise SiimError(f"out={out} is one of the files being exported")
    else:
        outputs.check_place(out, sources)
    if not out.exists():
        return
    if not overwrite:
        raise SiimError(f"export: {out} exists: choose another out= or give overwrite=true")
    if (out.suffix == ".zip") != out.is_file():
        raise SiimError(f"export: {out} exists and is a {'file' if out.is_file() else 'folder'}: not replacing it")
    if not is_bundle(out):
        raise SiimError(
            f"export: {out} exists and is not a bundle as export writes one (a {MANIFEST} and only the files it lists): "
            "overwrite=true replaces only a bundle"
        )


def export(cfg: Config) -> Path:
    """`siimcovid export`: pack the run(s) into a bundle folder or zip; returns its path."""
    if cfg.sign:
        signing.private_key(cfg.sign)  # a key that cannot sign fails before any packing
    src = export_sources(cfg)
    out = Path(cfg.out) if cfg.out else Path(cfg.project) / stages.stage("export").folder / src.name
    check_out(out, cfg.overwrite, [Path(cfg.project), *src.detect, *src.classify, src.fuse])
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
    record = source_record(src, members, prepared, Path(cfg.project))
    members = ordered([m for m, _ in det], fusion["det"]) + ordered([m for m, _ in cls], fusion["cls"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = work_folder(out)
    tmp = work / "bundle"
    try:
        tmp.mkdir()
        write_yaml(tmp / "prepare.yaml", prepare_settings(prepared, sizes))
        write_yaml(tmp / "fuse.yaml", fusion)
        dtypes = write_members(tmp, members, cfg.half)
        write_yaml(tmp / MANIFEST, manifest(tmp, record, cfg.half, dtypes))  # it lists every file
        if cfg.sign:  # last: it vouches for every file, the manifest included
            signing.sign_bundle(tmp, {rel: file_sha256(tmp / rel) for rel in [MANIFEST, *manifest_files(tmp)]}, cfg.sign)
        if out.suffix == ".zip":
            zip_tree(tmp, work / out.name)
            tmp = work / out.name
        move_into_place(tmp, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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


def inside(rel) -> bool:
    """Whether a path a bundle lists stays inside it: relative, '/'-separated, each part a plain name, not long."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or len(rel.encode("utf-8", "replace")) > MAX_PATH:
        return False
    return not any(map(name_problem, rel.split("/")))


def check_manifest(data: dict, where) -> dict:
    """The manifest's keys, format and files table: paths inside the bundle (none also another's folder), each
    with a sha256 and a size."""
    check_keys(data, MANIFEST_KEYS, MANIFEST, where)
    check_format(data, where)
    files = data.get("files")
    if not isinstance(files, dict):
        raise SiimError(f"bundle {where}: {MANIFEST} is not a bundle manifest (no `files` table)")
    folders = set()
    for rel, entry in files.items():
        if not inside(rel):
            raise SiimError(f"bundle {where}: {MANIFEST} lists {rel!r}, which is not a path inside the bundle")
        folders.update("/".join(rel.split("/")[:i]) for i in range(1, rel.count("/") + 1))
        ok = isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
        if not ok or not isinstance(entry.get("bytes"), int) or isinstance(entry["bytes"], bool) or entry["bytes"] < 0:
            raise SiimError(f"bundle {where}: {MANIFEST}: the entry of {rel} is not {{sha256: <64 hex digits>, bytes: <size>}}")
    clash = sorted(folders & (set(files) | {MANIFEST, SIGNATURE}))
    if clash:
        raise SiimError(f"bundle {where}: {MANIFEST} lists {clash[0]} as a file and as a folder")
    if {MANIFEST, SIGNATURE} & set(files):
        raise SiimError(f"bundle {where}: {MANIFEST} lists itself or {SIGNATURE}")
    return data


def check_format(data: dict, where) -> None:
    fmt = data.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
        raise SiimError(f"bundle {where}: {MANIFEST}: unknown bundle format {fmt!r} (this siimcovid reads format {FORMAT})")
    if fmt > FORMAT:
        raise SiimError(
            f"bundle {where}: {MANIFEST}: format {fmt} was written by a newer siimcovid ({data.get('siimcovid')}); "
            f"this one ({__version__}) reads format {FORMAT}: upgrade siimcovid"
        )
    if fmt < FORMAT:
        raise SiimError(
            f"bundle {where}: {MANIFEST}: format {fmt} (siimcovid {data.get('siimcovid')}) holds pickled checkpoints, "
            f"which run whatever code they hold when loaded; this siimcovid reads format {FORMAT} (weights only): "
            "export the runs again with `siimcovid export`"
        )


def check_versions(data: dict, where: Path) -> None:
    """Another major version of torch / Ultralytics / timm than the bundle's: an error; any other difference: a warning."""
    made = data.get("versions") if isinstance(data.get("versions"), dict) else {}
    made, here = {str(k): str(v) for k, v in made.items() if v}, package_versions()
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


def read_limited(path: Path, limit: int, rel: str, where) -> bytes:
    """A regular file's bytes (not a link, a FIFO or a device: each could point anywhere, block or never end), refused
    past `limit`."""
    try:
        return read_input(path, limit, rel, links=False)
    except SiimError as e:
        raise SiimError(f"bundle {where}: {rel}: {getattr(e, 'reason', e)}") from None


@dataclass
class Header:
    """What a bundle says of itself, read once: the manifest (its bytes, parsed) and the signature (parsed, or None).
    Every later check uses these bytes, not a second read of the files."""

    manifest: dict
    manifest_sha256: str
    signature: dict | None

    def vouched(self) -> dict[str, str]:
        """{path: sha256} of every file the bundle holds now, by its manifest (the manifest's own: of its bytes)."""
        return {MANIFEST: self.manifest_sha256, **{rel: e["sha256"] for rel, e in self.manifest["files"].items()}}


def header_of(manifest: bytes, signature: bytes | None, where) -> Header:
    data = check_manifest(parse_yaml(manifest, MANIFEST, where, MAX_MANIFEST_BYTES), where)
    parsed = parse_yaml(signature, SIGNATURE, where) if signature is not None else None
    if parsed is not None:
        signing.signature_of(parsed, where)  # a malformed signature stops here, before a zip is extracted
    return Header(data, hashlib.sha256(manifest).hexdigest(), parsed)


def read_header(root: Path, where) -> Header:
    if not os.path.lexists(root / MANIFEST):
        raise SiimError(f"bundle {where}: not a siimcovid bundle ({MANIFEST} missing)")
    manifest = read_limited(root / MANIFEST, MAX_MANIFEST_BYTES, MANIFEST, where)
    signature = read_limited(root / SIGNATURE, MAX_YAML_BYTES, SIGNATURE, where) if os.path.lexists(root / SIGNATURE) else None
    return header_of(manifest, signature, where)


def check_header(header: Header, trust, where) -> None:
    """Versions, then (trust=) the signature against what the manifest vouches for: before any file is read."""
    check_versions(header.manifest, where)
    if trust is not None:
        signing.check_signature(header.signature, trust, where, header.vouched())


# ----------------------------------------------------------------------------- zip bundles
def zip_root(names: list[str]) -> str | None:
    """The folder of the zip that holds manifest.yaml: '' (the top), or its one top folder (a zipped bundle folder)."""
    if MANIFEST in names:
        return ""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and f"{next(iter(tops))}/{MANIFEST}" in names:
        return next(iter(tops)) + "/"
    return None


def zip_entries(zf: zipfile.ZipFile, where) -> tuple[str, Header, dict[str, zipfile.ZipInfo]]:
    """(the bundle's folder in the zip, its header, {relative path: entry}), every entry checked against the
    manifest before anything is extracted: stored (a bundle's zip is never compressed: nothing can inflate),
    not encrypted, a listed path of the listed size, or the manifest and the signature."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    names = [i.filename for i in infos]
    if len(set(names)) < len(names):
        raise SiimError(f"bundle {where}: the zip holds two entries of one name: not extracting it")
    if not all(map(inside, names)):
        raise SiimError(f"bundle {where}: holds a path outside the bundle: not extracting it")
    odd = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED or i.flag_bits & 0x1]
    if odd:
        raise SiimError(f"bundle {where}: {odd[0]} is compressed or encrypted in the zip: a bundle's zip stores its files")
    prefix = zip_root(names)
    if prefix is None:
        raise SiimError(f"bundle {where}: not a siimcovid bundle ({MANIFEST} missing)")
    entries = {i.filename[len(prefix) :]: i for i in infos}
    if len(entries) < len(infos) or any(not i.filename.startswith(prefix) for i in infos):
        raise SiimError(f"bundle {where}: the zip holds files beside its bundle folder {prefix}: not extracting it")
    for rel, limit in ((MANIFEST, MAX_MANIFEST_BYTES), (SIGNATURE, MAX_YAML_BYTES)):
        if rel in entries and entries[rel].file_size > limit:
            raise SiimError(f"bundle {where}: {rel} is {entries[rel].file_size} bytes (a bundle's {rel} is at most {limit})")
    signature = read_entry(zf, entries[SIGNATURE], where) if SIGNATURE in entries else None
    header = header_of(read_entry(zf, entries[MANIFEST], where), signature, where)
    listed = header.manifest["files"]
    for rel, info in entries.items():
        if rel in (MANIFEST, SIGNATURE):
            continue
        if rel not in listed:
            raise SiimError(f"bundle {where}: {rel} is not listed in {MANIFEST}: not extracting it (not as exported)")
        if info.file_size != listed[rel]["bytes"]:
            raise SiimError(f"bundle {where}: {rel} is corrupt: its size in the zip is not the one {MANIFEST} lists")
    missing = sorted(set(listed) - set(entries))
    if missing:
        raise SiimError(f"bundle {where}: {missing[0]} is missing (listed in {MANIFEST}): an incomplete copy?")
    return prefix, header, entries


def read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise SiimError(f"bundle {where}: {info.filename} is corrupt ({e})") from None


def extract_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dst: Path, entry: dict | None, rel: str, where) -> None:
    """One zip entry to dst, streamed: never more bytes than listed, and its sha256 as listed (entry None: the
    manifest or the signature, checked by their readers)."""
    digest, written = hashlib.sha256(), 0
    limit = entry["bytes"] if entry else MAX_MANIFEST_BYTES
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(info) as src, open(dst, "xb") as out:
            while chunk := src.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise SiimError(f"bundle {where}: {rel} is corrupt: it holds more bytes than {MANIFEST} lists")
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, ValueError, RuntimeError, NotImplementedError) as e:
        raise SiimError(f"bundle {where}: {rel} is corrupt ({e})") from None
    except OSError as e:
        raise SiimError(f"bundle {where}: {rel} cannot be extracted to {dst.parent} ({e.strerror})") from None
    if entry and (written != entry["bytes"] or digest.hexdigest() != entry["sha256"]):
        raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")


def cached(cache: Path, prefix: str, header: Header, where) -> Header | None:
    """The header of the extracted copy of a zip in the cache, if there is one and it holds the zip's own manifest
    and signature byte for byte (a copy left by another zip, or planted by someone else, is refused)."""
    if not os.path.lexists(cache):
        return None
    if not stat.S_ISDIR(os.lstat(cache).st_mode) or (prefix and not stat.S_ISDIR(os.lstat(cache / prefix).st_mode)):
        raise SiimError(f"bundle {where}: its cache entry {cache} is not a folder siimcovid extracted: delete it")
    try:
        same = read_header(cache / prefix, where)
    except SiimError as e:
        raise SiimError(f"bundle {where}: its extracted copy {cache} is not the zip's ({e}): delete it") from None
    if same.manifest_sha256 != header.manifest_sha256 or same.signature != header.signature:
        raise SiimError(f"bundle {where}: its extracted copy {cache} holds another manifest than the zip: delete it")
    return same


def extract_zip(path: Path, trust) -> tuple[Path, Header, Path | None]:
    """A zip bundle -> (its bundle root in the cache, the header read there, the cache entry if extracted now).
    The zip is read through one handle (the bytes hashed are the bytes extracted); its header is checked (with
    trust=, the signature) before anything is extracted; every entry is checked against the manifest as it is
    streamed out into <cache>/<the zip's sha256>/."""
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise SiimError(f"bundle {path}: cannot be read ({e.strerror})") from None
    with handle:
        digest = stream_sha256(handle)
        handle.seek(0)
        try:
            zf = zipfile.ZipFile(handle)
        except (zipfile.BadZipFile, OSError) as e:
            raise SiimError(f"bundle {path}: neither a bundle folder nor a zip file ({e})") from None
        with zf:
            prefix, header, entries = zip_entries(zf, path)
            check_header(header, trust, path)
            cache = cache_dir() / digest
            copy = cached(cache, prefix, header, path)
            if copy is not None:
                return cache / prefix, copy, None
            extract_all(zf, entries, header, cache, prefix, path)
    try:
        return cache / prefix, cached(cache, prefix, header, path), cache  # what was extracted is what was checked
    except SiimError:
        shutil.rmtree(cache, ignore_errors=True)
        raise


def extract_all(zf: zipfile.ZipFile, entries: dict, header: Header, cache: Path, prefix: str, where) -> None:
    """Every entry into a temporary folder beside the cache entry, renamed to it at the end (all or nothing)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SiimError(f"bundle {where}: cannot make its cache folder {cache.parent} ({e.strerror})") from None
    need = sum(e["bytes"] for e in header.manifest["files"].values())
    free = shutil.disk_usage(cache.parent).free
    if need > free:
        raise SiimError(f"bundle {where}: needs {need / 1e9:.1f} GB to extract, {cache.parent} has {free / 1e9:.1f} GB")
    tmp = temp_dir_beside(cache, suffix="")
    try:
        for rel, info in tqdm(entries.items(), desc="extract bundle", unit="file", leave=False):
            extract_entry(zf, info, tmp / prefix / rel, header.manifest["files"].get(rel), rel, where)
        with contextlib.suppress(OSError):  # another process extracted it meanwhile: keep theirs
            os.rename(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- files
def check_files(root: Path, data: dict, where) -> None:
    """Regular files only (no link, device or pipe anywhere), every listed file present, of its size and sha256;
    no file unlisted."""
    present = set()
    for folder, dirs, files in os.walk(root):  # links to folders are listed in dirs, never followed
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and name in dirs)):
                raise SiimError(f"bundle {where}: {rel} is not a regular file or folder (a link, a device or a pipe)")
            if stat.S_ISREG(mode):
                present.add(rel)
    listed = data["files"]
    for rel, entry in tqdm(listed.items(), desc="check bundle", unit="file", leave=False):
        if rel not in present:
            raise SiimError(f"bundle {where}: {rel} is missing (listed in {MANIFEST}): an incomplete copy?")
        if (root / rel).stat().st_size != entry["bytes"] or file_sha256(root / rel) != entry["sha256"]:
            raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")
    extra = sorted(present - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise SiimError(f"bundle {where}: {extra[0]} is not listed in {MANIFEST} ({len(extra)} unlisted): not as exported")


def bundle_yaml(root: Path, rel: str, header: Header, where) -> dict:
    """A bundle's YAML file, parsed from the bytes whose sha256 is checked (read once: what is parsed is what was
    vouched for)."""
    entry = header.manifest["files"].get(rel)
    if entry is None:
        raise SiimError(f"bundle {where}: {rel} is missing")
    data = read_limited(root / rel, MAX_YAML_BYTES, rel, where)
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise SiimError(f"bundle {where}: {rel} is corrupt: its checksum does not match {MANIFEST}")
    return parse_yaml(data, rel, where)


# ----------------------------------------------------------------------------- settings, typed as the stages type them
def typed(stage: str, key: str, value, rel: str, where):
    """A bundle's value of a stage setting, checked against that setting's type in cfg/<stage>.yaml."""
    try:
        return schema(stage).check(key, value)
    except SiimError as e:
        raise SiimError(f"bundle {where}: {rel}: {e}") from None


def check_keys(data: dict, known, rel: str, where) -> None:
    unknown = sorted(map(str, set(data) - set(known)))
    if unknown:
        raise SiimError(f"bundle {where}: {rel}: unknown key(s) {unknown} (this siimcovid knows {sorted(known)})")


def member_settings(kind: str, data: dict, rel: str, where, model: dict) -> dict:
    """A member's settings.yaml, every value typed (detect and classify predict's own types; `classes`: of the
    model's classes)."""
    if kind == "classify":
        check_keys(data, ("imgsz", "tta", "weights", "folds_id"), rel, where)
        out = {k: typed("classify", k, data.get(k), rel, where) for k in ("imgsz", "tta", "weights")}
        return {**out, "folds_id": data.get("folds_id") if isinstance(data.get("folds_id"), dict) else {}}
    from siimcovid.detect.predict import PREDICT_KEYS

    check_keys(data, ("size", "imgsz", *PREDICT_KEYS, "weights", "ultralytics"), rel, where)
    out = {k: typed("detect", k, data.get(k), rel, where) for k in (*PREDICT_KEYS, "weights")}
    out["size"] = typed("detect", "imgsz", data.get("size"), rel, where)  # a prepared side: an image size
    imgsz = data.get("imgsz")
    if not isinstance(imgsz, dict) or not imgsz:
        raise SiimError(f"bundle {where}: {rel}: imgsz must map each fold to its training image size")
    out["imgsz"] = {}
    for fold, size in imgsz.items():
        if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
            raise SiimError(f"bundle {where}: {rel}: imgsz has a key {fold!r}, not a fold number")
        out["imgsz"][fold] = typed("detect", "imgsz", size, rel, where)
    extra = data.get("ultralytics") or {}
    if not isinstance(extra, dict):
        raise SiimError(f"bundle {where}: {rel}: `ultralytics` is not a mapping")
    check_keys(extra, ULTRALYTICS_PREDICT, f"{rel}: ultralytics", where)
    for key, value in extra.items():
        nc = len(model["names"])
        is_class = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < nc  # noqa: E731
        ok = isinstance(value, bool) if ULTRALYTICS_PREDICT[key] is bool else value is None or (
            isinstance(value, list) and all(map(is_class, value)))  # fmt: skip
        if not ok:
            what = "a bool" if ULTRALYTICS_PREDICT[key] is bool else f"a list of the model's classes (0 to {nc - 1})"
            raise SiimError(f"bundle {where}: {rel}: ultralytics {key}={value!r}: expected {what}")
    if extra:
        out["ultralytics"] = dict(extra)
    return out


def prepare_record(data: dict, sizes: set[int], where) -> dict:
    """prepare.yaml: the sizes, ext and png_level predict converts new images with (prepare's own types); the sizes
    are those the members read, no more (each is an image written per source image)."""
    check_keys(data, ("sizes", *CONVERSION_KEYS), "prepare.yaml", where)
    out = {k: typed("prepare", k, data.get(k), "prepare.yaml", where) for k in ("sizes", *CONVERSION_KEYS)}
    if set(out["sizes"]) != sizes:
        raise SiimError(f"bundle {where}: prepare.yaml: sizes {out['sizes']}, but its members read {sorted(sizes)}")
    return out


def fusion_record(data: dict, where) -> dict:
    """fuse.yaml: every fusion setting (fuse's own types) and the member names of det: and cls:."""
    from siimcovid.config import fusion_keys

    keys = fusion_keys()
    check_keys(data, (*keys, "det", "cls"), "fuse.yaml", where)
    out = {k: typed("fuse", k, data[k], "fuse.yaml", where) for k in keys if k in data}
    for key in KINDS.values():
        names = data.get(key) or []
        if not isinstance(names, list) or any(name_problem(n) for n in names) or len(set(map(str, names))) < len(names):
            raise SiimError(f"bundle {where}: fuse.yaml: {key}: {names!r} is not a list of distinct member names")
        out[key] = [str(n) for n in names]
    return out


def read_member(root: Path, kind: str, name: str, header: Header, where) -> Member:
    """One member of fuse.yaml's lists: its description, its settings and its fold weights (at least one), each
    weights file's tensors checked against the model its description builds (on the meta device: no memory)."""
    listed = header.manifest["files"]
    pattern = re.compile(rf"{re.escape(kind)}/{re.escape(name)}/fold(\d{{1,4}}){re.escape(weights.SUFFIX)}")
    found = {int(m[1]): root / rel for rel in listed if (m := pattern.fullmatch(rel))}
    if not found:
        raise SiimError(f"bundle {where}: {kind}/{name}/ has no fold<k>{weights.SUFFIX}: a member with no folds")
    rel = f"{kind}/{name}/{weights.DESCRIPTION}"
    model = weights.check_description(bundle_yaml(root, rel, header, where), kind, f"bundle {where}: {rel}")
    rel = f"{kind}/{name}/settings.yaml"
    settings = member_settings(kind, bundle_yaml(root, rel, header, where), rel, where, model)
    if kind == "detect" and set(found) - set(settings["imgsz"]):
        raise SiimError(f"bundle {where}: {rel} gives no imgsz for folds {sorted(set(found) - set(settings['imgsz']))}")
    shapes = {}
    for k, path in sorted(found.items()):
        rel = path.relative_to(root).as_posix()
        fold = weights.header_shapes(path, f"bundle {where}: {rel}")
        if fold != shapes:  # the folds of a member share an architecture: each new one is built once, on meta
            weights.check_fits(model, kind, fold, f"bundle {where}: {rel}", settings["imgsz"] if kind == "classify" else None)
            shapes = fold
    digests = {k: listed[p.relative_to(root).as_posix()]["sha256"] for k, p in found.items()}
    return Member(kind, name, dict(sorted(found.items())), settings, model, digests)


def member_files(member: Member, root: Path) -> set[str]:
    """The files of one member (relative paths), as export writes them."""
    folder = f"{member.kind}/{member.name}"
    weights_files = {p.relative_to(root).as_posix() for p in member.weights.values()}
    return {f"{folder}/{weights.DESCRIPTION}", f"{folder}/settings.yaml", *weights_files}


def read_members(root: Path, header: Header, fusion: dict, where) -> dict[str, list[Member]]:
    """{kind: members in fuse.yaml's order}; a file that is none of the bundle's files (TOP_FILES and those of the
    members fuse.yaml names) is an error: a bundle holds nothing else, so nothing else can be slipped in."""
    out = {kind: [read_member(root, kind, n, header, where) for n in fusion[key]] for kind, key in KINDS.items()}
    if not out["detect"] and not out["classify"]:
        raise SiimError(f"bundle {where}: fuse.yaml names no member (det: [], cls: [])")
    known = set(TOP_FILES).union(*(member_files(m, root) for members in out.values() for m in members))
    unknown = sorted(set(header.manifest["files"]) - known)
    if unknown:
        first = unknown[0].split("/")
        member = first[0] in KINDS and len(first) > 2 and first[1] not in fusion[KINDS[first[0]]]
        why = f"{first[0]}/{first[1]}/ is not a member of fuse.yaml's {KINDS[first[0]]}" if member else "not a file of a bundle"
        raise SiimError(f"bundle {where}: {unknown[0]}: {why} ({len(unknown)} such file(s)): not as exported")
    return out


def read_bundle(root: Path, header: Header, where) -> Bundle:
    """The checked files of a bundle root -> the Bundle (its YAML parsed from checked bytes, its members)."""
    fusion = fusion_record(bundle_yaml(root, "fuse.yaml", header, where), where)
    members = read_members(root, header, fusion, where)
    sizes = {m.settings["size"] for m in members["detect"]} | {m.settings["imgsz"] for m in members["classify"]}
    prepare = prepare_record(bundle_yaml(root, "prepare.yaml", header, where), sizes, where)
    return Bundle(root, header.manifest, prepare, fusion, header.manifest_sha256, members["detect"], members["classify"])


def open_bundle(path: str | Path, trust: str | Path | None = None) -> Bundle:
    """A bundle folder or zip, every check done before any work (each a SiimError naming the bundle and the file).
    trust: a public key file or a folder of them: the bundle must be signed by one of them (siimcovid.signing)."""
    where = Path(path)
    if not where.exists():
        raise SiimError(f"bundle {where} not found")
    if trust is not None:
        signing.trusted_keys(trust)  # a bad trust= fails before a zip is read
    if where.is_file():
        root, header, fresh = extract_zip(where, trust)  # its header checked (versions, signature) before extraction
    else:
        root, header, fresh = where, read_header(where, where), None
        check_header(header, trust, where)
    try:
        check_files(root, header.manifest, where)
        bundle = read_bundle(root, header, where)
    except SiimError as e:
        if fresh is not None:  # extracted now, refused now: nothing of it stays in the cache
            shutil.rmtree(fresh, ignore_errors=True)
        elif root != where:  # a copy extracted earlier from this zip, changed since
            raise SiimError(f"{e} (in the extracted copy {root}: delete it to extract the zip again)") from None
        raise
    if trust is None:
        signing.unsigned_note(header.signature, where)
    return bundle

"""The members of a bundle: a member kind per model family, behind one small interface: Kind.

A member is <kind>/<name>/ in the bundle (kind: the stage, detect | classify; or lung, the YOLO lung detector that the
members of crop=lung crop with: LUNG): model.yaml (its data-only
description, its `family:` naming the family), settings.yaml (its predict settings, declared: DETECT_SETTINGS,
CLASSIFY_SETTINGS, a family's own) and one fold<k>.safetensors per finished fold. What export and open_bundle need
of a member, and nothing else, is its `Kind`, found by kind_of(kind, family): the built-in families' in KINDS (their
bundle_kind()), any other family's from its builders (family_kind):

    key         its list in the bundle's fuse.yaml: det | cls
    settings    the declaration of its settings.yaml (siimcovid.artifacts.Document: writer and reader)
    member      (run folder, its predict Config, anchors, weights= or None) -> (Member, the prepared folder it trained on)
    pack        (a fold's checkpoint in the run, the safetensors to write, half) -> (dtype, description, fold fingerprint)
    size        settings -> the prepared side the member reads (one of prepare.yaml's sizes)
    fit_size    settings -> the image size its weights are checked to run at (weights.check_fits), or None
    check       (settings, model description, folds found, label) -> None: what its settings owe its model and folds
    describe, fits, predict   a family's own checks of model.yaml and of the tensors, and its prediction (None for
                the built-in kinds: siimcovid.weights checks them, siimcovid.predict.members predicts them)

Lung-crop views (crop=lung, siimcovid.views): a member whose run's predict made its tables with crop=lung carries, in
its settings.yaml, crop: lung, lung: <the name of the lung member it crops with> and the settings that turn a lung box
into a window and the views into one (siimcovid.views.VIEW_KEYS of its stage: check_views). That is the one place the
fact is kept: the bundle's lung members (lung/<name>/, a YOLO detector member of task=lung) are those its members name;
one that no member names, or a name with no such member, is refused when the bundle is opened. Lung fold k crops for
fold k of each member, so a lung member has every fold of the members that crop with it, and no other (export packs
those; open_bundle refuses a fold more). Export refuses a member whose run recorded crops of another pred_oof.csv of
the lung run than the one there now (lung_oof_sha256: the lung run was predicted again after it trained).

A family is looked up by name in the registry, never imported by what a bundle says. A run's checkpoints are the
user's own files (pickles are read only there, never from a bundle); classify's best.pt is read as classify.predict
reads it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from siimcovid import weights
from siimcovid.artifacts import Document, Key, check_keys
from siimcovid.bundle.engines import engine_files, found_engines
from siimcovid.bundle.files import MAX_YAML_BYTES, typed
from siimcovid.config import Config
from siimcovid.detect.predict import PREDICT_KEYS
from siimcovid.rundir import read_run, saved_predict_settings
from siimcovid.utils import LOGGER, SiimError, name_problem
from siimcovid.views import VIEW_KEYS

ULTRALYTICS_PREDICT = {"agnostic_nms": bool, "classes": list}  # Ultralytics predict arguments a bundle may carry
LUNG_KIND = "lung"  # the lung detectors' kind (their folder in a bundle): members name them, fuse.yaml does not


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
    family: str = ""  # the model family that trained it (siimcovid.engine.family); "": its kind's built-in one
    engines: dict[str, dict[int, Path]] = field(default_factory=dict)  # {onnx | openvino | int8: {fold: its first file}}
    engine_digests: dict[str, dict] = field(default_factory=dict)  # {engine file name: its manifest entry (sha256, bytes)}


@dataclass(frozen=True)
class Kind:
    """What export and open_bundle need of one member kind (module docstring)."""

    key: str
    settings: Document
    member: Callable
    pack: Callable
    size: Callable[[dict], int]
    fit_size: Callable[[dict], int | None]
    check: Callable[[dict, dict, set, str], None]
    describe: Callable[[dict, str], dict] | None = None  # (model.yaml, label) -> the checked description
    fits: Callable[[dict, dict, str, int | None], None] | None = None  # (description, tensor shapes, label, size)
    predict: Callable | None = None  # (member, prepared, predict's Hardware, tta) -> its table on the test images


def locate(text: str | Path, anchors: list[Path]) -> Path | None:
    """A path a run recorded (maybe relative to the folder the run was started in): as given, else under an anchor."""
    path = Path(text)
    for cand in [path] + ([] if path.is_absolute() else [a / path for a in anchors]):
        if cand.exists():
            return cand
    return None


# ----------------------------------------------------------------------------- lung-crop views
def lung_of(settings: dict) -> str | None:
    """The lung member a member's settings crop with (crop=lung), else None: whole images only."""
    return settings.get("lung") if settings.get("crop", "none") == "lung" else None


def member_name(value, label: str) -> str:
    """lung: the name of the lung member a member crops with (lung/<name>/ of the bundle): one plain name."""
    if not isinstance(value, str) or name_problem(value):
        raise SiimError(f"{label}: lung={value!r} is not the name of a lung member (lung/<name>/)")
    return value


def view_keys(stage: str) -> tuple[Key, ...]:
    """The optional keys of a member's lung-crop views (absent: crop=none): crop, lung and the stage's VIEW_KEYS, each
    typed as cfg/<stage>.yaml types it."""
    crop = Key("crop", f"{stage} predict's crop: lung = each image also seen cropped to its lung box (absent: none)",
               typed(stage, "crop"), optional=True)  # fmt: skip
    lung = Key("lung", "crop=lung: the lung member (lung/<name>/) whose fold k boxes crop for fold k", member_name, optional=True)
    keys = VIEW_KEYS[stage]
    views = (Key(k, f"crop=lung: {stage} predict's {k} (cfg/{stage}.yaml)", typed(stage, k), optional=True) for k in keys)
    return (crop, lung, *views)


def check_views(settings: dict, stage: str, label: str) -> None:
    """crop=lung gives the lung member and every view setting of the stage; crop=none (or absent) none of them."""
    views = ("lung", *VIEW_KEYS[stage])
    if settings.get("crop", "none") == "lung":
        missing = [k for k in views if k not in settings]
        if missing:
            raise SiimError(f"{label}: crop=lung without {', '.join(missing)}: not as exported")
    elif any(k in settings for k in views):
        raise SiimError(f"{label}: {', '.join(k for k in views if k in settings)} given with crop=none: not as exported")


def view_settings(run_dir: Path, saved: dict, stage: str, anchors: list[Path]) -> dict:
    """The lung-crop views a run's predict made its test tables with (its predict.yaml: crop, lung and the stage's
    VIEW_KEYS, as siimcovid.views.view_record writes them); {} for crop=none. The lung run is checked to be one
    (task=lung, its predictions) of the run's folds, whose pred_oof.csv is the one the run trained its crops with (its
    lung_oof_sha256); `lung` is its folder until export names the lung member (export.lung_members)."""
    from siimcovid.views import LungBoxes

    record = Path(run_dir) / f"{stage}.yaml"
    trained = read_run(record) if record.is_file() else {}
    if saved.get("crop", "none") == "none":
        if trained.get("crop") == "lung":
            LOGGER.warning(
                f"export: {run_dir} trained with crop=lung, but its predict recorded whole images only (crop=none): the "
                f"bundle predicts whole images; `siimcovid {stage} predict run={run_dir} crop=lung lung=<its lung run>` "
                "first to carry its views"
            )
        return {}
    lung = locate(saved["lung"], anchors) if saved.get("lung") else None
    if lung is None:
        raise SiimError(f"export: {run_dir}: its predict cropped with lung={saved.get('lung')}, which is not found")
    missing = [k for k in VIEW_KEYS[stage] if k not in saved]
    if missing:
        raise SiimError(f"export: {run_dir}: its predict.yaml says crop=lung but not {', '.join(missing)}: predict it again")
    boxes = LungBoxes.of_run(lung)
    boxes.check_folds(trained.get("folds_id"), f"export: {run_dir}")
    boxes.check_oof(trained.get("lung_oof_sha256"), f"export: {record}")  # its crops came from these boxes, not others
    return {"crop": "lung", "lung": str(Path(lung).resolve()), **{k: saved[k] for k in VIEW_KEYS[stage]}}


# ----------------------------------------------------------------------------- detect
def fold_sizes(value, label: str) -> dict[int, int]:
    """imgsz: {fold: the image size it trained at}."""
    if not isinstance(value, dict) or not value:
        raise SiimError(f"{label}: imgsz must map each fold to its training image size")
    out = {}
    for fold, size in value.items():
        if not isinstance(fold, int) or isinstance(fold, bool) or fold < 0:
            raise SiimError(f"{label}: imgsz has a key {fold!r}, not a fold number")
        out[fold] = typed("detect", "imgsz")(size, label)
    return out


def ultralytics_args(value, label: str) -> dict:
    """ultralytics: a mapping of the arguments of ULTRALYTICS_PREDICT (their values: check_detector, with the model)."""
    value = value or {}
    if not isinstance(value, dict):
        raise SiimError(f"{label}: `ultralytics` is not a mapping")
    check_keys(value, ULTRALYTICS_PREDICT, f"{label}: ultralytics")
    return dict(value)


DETECT_SETTINGS = Document(
    "settings.yaml",
    "<bundle>/detect/<name>/settings.yaml",
    (
        Key("size", "the prepared side it reads (one of prepare.yaml's sizes)", typed("detect", "imgsz")),
        Key("imgsz", "{fold: the image size it trained at}", fold_sizes),
        *(Key(k, f"detect predict's {k} (cfg/detect.yaml)", typed("detect", k)) for k in PREDICT_KEYS),
        Key("weights", "the fold checkpoints packed: best | last", typed("detect", "weights")),
        Key(
            "ultralytics",
            f"Ultralytics predict arguments the run gave ({', '.join(ULTRALYTICS_PREDICT)})",
            ultralytics_args,
            optional=True,
        ),
        *view_keys("detect"),
    ),
    "a detector's predict settings, as its run's predict made its pred_test.csv",
    max_bytes=MAX_YAML_BYTES,
)


def detector_member(run_dir: Path, pcfg: Config, anchors: list[Path], explicit: str | None = None) -> tuple[Member, Path]:
    """A finished detect run -> its Member (source checkpoints) and the prepared folder it trained on."""
    from siimcovid.detect.common import passthrough
    from siimcovid.detect.predict import load_run

    saved = saved_predict_settings(run_dir)  # what made its own pred_test.csv, when its predict recorded it
    chosen = explicit or saved.get("weights", pcfg.weights)
    run = load_run(run_dir, chosen)  # refuses folds still training
    settings = {"size": run.size, "imgsz": dict(run.imgsz), **{k: saved.get(k, pcfg[k]) for k in PREDICT_KEYS}}
    settings["weights"] = chosen
    extra = saved.get("ultralytics", {}) if saved else passthrough(pcfg)  # Ultralytics arguments the run gave (agnostic_nms...)
    dropped = sorted(set(extra) - set(ULTRALYTICS_PREDICT))
    if dropped:
        LOGGER.warning(f"export: {run_dir}: its predict's Ultralytics arguments {dropped} do not travel (a bundle carries "
                       f"{sorted(ULTRALYTICS_PREDICT)}, which change the boxes)")  # fmt: skip
    extra = {k: v for k, v in extra.items() if k in ULTRALYTICS_PREDICT}
    if extra:
        settings["ultralytics"] = extra
    settings |= view_settings(run_dir, saved, "detect", anchors)
    return Member("detect", run.name, dict(run.weights), settings), run.prepared.root


def lung_member(run_dir: Path, pcfg: Config, anchors: list[Path], explicit: str | None = None) -> tuple[Member, Path]:
    """A finished lung detector run (`detect train task=lung`, family yolo) -> its Member of kind lung (the weights
    its predict recorded, not export's weights=: what made the boxes the members cropped with)."""
    record = read_run(Path(run_dir) / "detect.yaml") if (Path(run_dir) / "detect.yaml").is_file() else {}
    if record.get("task") != "lung" or (record.get("family") or "yolo") != "yolo":
        raise SiimError(f"export: {run_dir} is not a lung detector run (`detect train task=lung`, family yolo)")
    member, prepared = detector_member(run_dir, pcfg, anchors, None)
    member.kind = LUNG_KIND
    return member, prepared


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


def check_detector(settings: dict, model: dict, folds: set, label: str) -> None:
    """Every fold has its imgsz; `ultralytics` classes are classes of the model (of its names)."""
    if folds - set(settings["imgsz"]):
        raise SiimError(f"{label} gives no imgsz for folds {sorted(folds - set(settings['imgsz']))}")
    nc = len(model["names"])
    is_class = lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < nc  # noqa: E731
    for key, value in settings.get("ultralytics", {}).items():
        ok = isinstance(value, bool) if ULTRALYTICS_PREDICT[key] is bool else value is None or (
            isinstance(value, list) and all(map(is_class, value)))  # fmt: skip
        if not ok:
            what = "a bool" if ULTRALYTICS_PREDICT[key] is bool else f"a list of the model's classes (0 to {nc - 1})"
            raise SiimError(f"{label}: ultralytics {key}={value!r}: expected {what}")
    if not settings.get("ultralytics"):
        settings.pop("ultralytics", None)
    check_views(settings, "detect", label)


def check_lung(settings: dict, model: dict, folds: set, label: str) -> None:
    """A lung member: a detector of one class, lung (`detect train task=lung`), that crops with nothing itself."""
    check_detector(settings, model, folds, label)
    if list(model["names"]) != ["lung"]:
        raise SiimError(f"{label}: a lung member detects lung alone, not {list(model['names'])}: not a lung detector")
    if settings.get("crop", "none") != "none":
        raise SiimError(f"{label}: a lung detector with crop={settings['crop']}: it makes the crops, it is not cropped")


# ----------------------------------------------------------------------------- classify
def classifier_tta(value, label: str) -> str:
    """tta: a view name (siimcovid.classify.tta); a bundle of the releases where tta was on or off says true / false,
    read as hflip / none (its one view), and predicts as it did."""
    from siimcovid.classify.tta import tta_name

    return tta_name(typed("classify", "tta")(value, label), f"{label}: tta")


CLASSIFY_SETTINGS = Document(
    "settings.yaml",
    "<bundle>/classify/<name>/settings.yaml",
    (
        Key("imgsz", "the image size it trained at and reads (one of prepare.yaml's sizes)", typed("classify", "imgsz")),
        Key("tta", "classify predict's tta: none | hflip | vflip | d4 (true / false: hflip / none)", classifier_tta),
        Key("weights", "the fold checkpoints packed: best | last", typed("classify", "weights")),
        Key("folds_id", "{fold: the fold fingerprint it trained on}", lambda v, label: v if isinstance(v, dict) else {}),
        Key("task", "classify train's task: none = a binary none model, listed in fuse.yaml's none_cls (absent: study)",
            typed("classify", "task"), optional=True),  # fmt: skip
        *view_keys("classify"),
    ),
    "a classifier's predict settings, as its run's predict made its pred_test tables",
    max_bytes=MAX_YAML_BYTES,
)


def classifier_member(run_dir: Path, pcfg: Config, anchors: list[Path], explicit: str | None = None) -> tuple[Member, Path]:
    """A finished classify run -> its Member (source checkpoints) and the prepared folder it trained on."""
    from siimcovid.classify.files import FILES
    from siimcovid.classify.predict import fold_checkpoints

    saved = run_dir / FILES.settings
    if not saved.is_file():
        raise SiimError(f"export: {run_dir} is not a classify run (no {FILES.settings})")
    run_cfg = read_run(saved)  # its settings and what it learned (siimcovid.rundir.write_run)
    saved = saved_predict_settings(run_dir)  # what made its own pred_test tables, when its predict recorded it
    chosen = explicit or saved.get("weights", pcfg.weights)
    weights_files = fold_checkpoints(run_dir, False, chosen)  # refuses folds still training
    prepared = locate(run_cfg["data"], [*anchors, *run_dir.resolve().parents])
    if prepared is None:
        raise SiimError(f"export: {saved}: its prepared folder {run_cfg['data']} is not found")
    tta = classifier_tta(saved.get("tta", pcfg.tta), f"export: {run_dir}")  # a view name (true / false recorded before)
    settings = {"imgsz": int(run_cfg["imgsz"]), "tta": tta, "weights": chosen}
    settings |= {"task": "none"} if run_cfg.get("task") == "none" else {}  # a binary none model (fuse's none_cls)
    settings |= view_settings(run_dir, saved, "classify", anchors)
    return Member("classify", run_dir.name, weights_files, settings), prepared


def pack_classifier(src: Path, dst: Path, half: bool) -> tuple[str, dict, str | None]:
    """A classify checkpoint of a run (the user's own: a pickle is read here, never from a bundle) -> the weights
    load_checkpoint_model evaluates (the EMA of a last.pt) as safetensors at dst (half: fp16).
    Returns (the weights' dtype, the model's description, the fold fingerprint it trained on)."""
    import torch

    from siimcovid.classify.predict import checkpoint_folds_id, load_checkpoint_model

    model, ckpt = load_checkpoint_model(src, torch.device("cpu"))
    dtype = weights.save_state(model.state_dict(), dst, half)
    return dtype, weights.classifier_description(ckpt["model_cfg"]), checkpoint_folds_id(src, ckpt)


KINDS = {  # the member kinds of the built-in families (their bundle_kind): the detector's and the classifier's
    "detect": Kind(
        "det", DETECT_SETTINGS, detector_member, pack_detector, lambda s: s["size"], lambda s: None, check_detector
    ),
    "classify": Kind(
        "cls", CLASSIFY_SETTINGS, classifier_member, pack_classifier, lambda s: s["imgsz"], lambda s: s["imgsz"],
        lambda settings, model, folds, label: check_views(settings, "classify", label),
    ),
}  # fmt: skip
LUNG = Kind(LUNG_KIND, DETECT_SETTINGS, lung_member, pack_detector, lambda s: s["size"], lambda s: None, check_lung)
BUILTIN = {"detect": ("yolo", "ultralytics"), "classify": ("timm", "timm-labels")}  # families (and model.yaml's names)
BUILTIN[LUNG_KIND] = BUILTIN["detect"]


def stage_of(kind: str) -> str:
    """The stage whose models a member kind holds (a lung member: a detector)."""
    return "detect" if kind == LUNG_KIND else kind


def kind_of(kind: str, family: str | None = None) -> Kind:
    """The member kind of a family (its bundle_kind(); the two built-in families': the table above; a family of its
    own: family_kind), the family looked up by name in the registry: a bundle never names a module to import."""
    from siimcovid.engine.family import family_class

    if kind == LUNG_KIND:  # the lung detector is a YOLO one (detect train task=lung is family yolo only)
        if family not in ("", None, *BUILTIN[LUNG_KIND]):
            raise SiimError(f"family={family}: a lung detector member is family yolo (`detect train task=lung`)")
        return LUNG
    if kind not in KINDS:
        raise SiimError(f"no member kind {kind!r} (kinds: {', '.join([*KINDS, LUNG_KIND])})")
    cls = family_class(family or BUILTIN[kind][0], kind)
    spec = cls.bundle_kind() or family_kind(kind, cls)
    own = spec in KINDS.values() or None not in (spec.describe, spec.fits, spec.predict)
    if not isinstance(spec, Kind) or spec.key != KINDS[kind].key or not own:
        raise SiimError(f"family={cls.name}: its bundle_kind() is not a {kind} member kind with describe, fits and predict")
    return spec


def family_kind(kind: str, cls) -> Kind:
    """The member kind of a family without a bundle_kind of its own: each finished fold's checkpoint packed by its
    pack_state into safetensors, its model.yaml {family: <name>, ...its description}, checked by its
    check_description and check_state when a bundle is opened, predicted through the fold engine (from_state)."""
    from siimcovid.config import Config
    from siimcovid.data.prepared import Prepared
    from siimcovid.engine import folds
    from siimcovid.rundir import fold_checkpoints

    settings = Document(
        "settings.yaml", f"<bundle>/{kind}/<name>/settings.yaml",
        (Key("imgsz", "the prepared side it reads (one of prepare.yaml's sizes)", typed(kind, "imgsz")),),
        f"a {cls.name} member's settings", max_bytes=MAX_YAML_BYTES,
    )  # fmt: skip

    def member(run_dir: Path, pcfg: Config, anchors: list[Path], explicit: str | None = None):
        family, record = cls(pcfg), read_run(Path(run_dir) / cls.files.settings)
        done = lambda folder: family.fold_state(folder) == "done"  # noqa: E731
        found = fold_checkpoints(run_dir, cls.files.best, done, False, kind)  # refuses folds still training
        prepared = locate(record.get("data") or record["prepared"], [*anchors, *Path(run_dir).resolve().parents])
        if prepared is None:
            raise SiimError(f"export: {run_dir}: its prepared folder is not found")
        size = record.get("imgsz") or record.get("size") or Prepared(prepared).sizes[0]
        return Member(kind, Path(run_dir).name, found, {"imgsz": int(size)}, family=cls.name), prepared

    def pack(src: Path, dst: Path, half: bool):
        state, desc = cls(Config()).pack_state(src)
        return weights.save_state(state, dst, half), {"family": cls.name, **desc}, None

    def describe(desc, label: str) -> dict:
        if not isinstance(desc, dict) or desc.get("family") != cls.name:
            raise SiimError(f"{label}: not a description of family {cls.name}")
        return {"family": cls.name, **cls(Config()).check_description({k: v for k, v in desc.items() if k != "family"}, label)}

    def fits(desc: dict, shapes: dict, label: str, size) -> None:
        cls(Config()).check_state(desc, shapes, label)

    def predict(m: Member, prepared, hw, tta):
        family = cls(Config())
        family.packed = {path: (m.model, m.digests.get(k)) for k, path in m.weights.items()}
        return folds.predict(family, prepared, m.weights, ["test"], hw.device)["test"].assign(model=m.name)

    size = lambda s: s["imgsz"]  # noqa: E731
    return Kind(KINDS[kind].key, settings, member, pack, size, lambda s: None, lambda *a: None, describe, fits, predict)


def run_family(run_dir: Path, kind: str) -> str:
    """The family a run folder recorded (its settings file's learned section; "" for the built-in one)."""
    from siimcovid.engine.family import family_class

    stage = stage_of(kind)
    family = read_run(Path(run_dir) / family_class(BUILTIN[kind][0], stage).files.settings).get("family") or ""
    return "" if family in BUILTIN[kind] else family


def describe(spec: Kind, kind: str, model, label: str) -> dict:
    """A member's model.yaml checked by its kind (the built-in: siimcovid.weights) or its family."""
    return spec.describe(model, label) if spec.describe else weights.check_description(model, stage_of(kind), label)


def fits(spec: Kind, kind: str, model: dict, shapes: dict, label: str, size) -> None:
    if spec.fits:
        return spec.fits(model, shapes, label, size)
    weights.check_fits(model, stage_of(kind), shapes, label, size)


# ----------------------------------------------------------------------------- reading a member (open_bundle)
def read_member(root: Path, kind: str, name: str, listed: dict, read_yaml_file: Callable, where) -> Member:
    """One member of fuse.yaml's lists: its description, its settings and its fold weights (at least one), each
    weights file's tensors checked against the model its description builds (on the meta device: no memory).
    listed: the manifest's files; read_yaml_file(rel, declaration or None): a checked file's mapping."""
    pattern = re.compile(rf"{re.escape(kind)}/{re.escape(name)}/fold(\d{{1,4}}){re.escape(weights.SUFFIX)}")
    found = {int(m[1]): root / rel for rel in listed if (m := pattern.fullmatch(rel))}
    if not found:
        raise SiimError(f"bundle {where}: {kind}/{name}/ has no fold<k>{weights.SUFFIX}: a member with no folds")
    rel = f"{kind}/{name}/{weights.DESCRIPTION}"
    raw = read_yaml_file(rel, None)
    family = str(raw.get("family") or "") if isinstance(raw, dict) else ""
    family = "" if family in BUILTIN[kind] else family
    try:  # a name the registry looks up, never a module to import
        spec = kind_of(kind, family)
    except SiimError as e:
        raise SiimError(f"bundle {where}: {rel}: family {family!r} is no {kind} family of this siimcovid ({e})") from None
    model = describe(spec, kind, raw, f"bundle {where}: {rel}")
    rel = f"{kind}/{name}/settings.yaml"
    settings = read_yaml_file(rel, spec.settings)
    spec.check(settings, model, set(found), f"bundle {where}: {rel}")
    shapes = {}
    for k, path in sorted(found.items()):
        rel = path.relative_to(root).as_posix()
        fold = weights.header_shapes(path, f"bundle {where}: {rel}")
        if fold != shapes:  # the folds of a member share an architecture: each new one is built once, on meta
            fits(spec, kind, model, fold, f"bundle {where}: {rel}", spec.fit_size(settings))
            shapes = fold
    digests = {k: listed[p.relative_to(root).as_posix()]["sha256"] for k, p in found.items()}
    member = Member(kind, name, dict(sorted(found.items())), settings, model, digests, family)
    member.engines = found_engines(kind, name, listed, root, set(found), where)
    if member.engines and family:
        raise SiimError(f"bundle {where}: {kind}/{name}/ (family={family}) holds exported engines: export writes none for it")
    member.engine_digests = {Path(rel).name: listed[rel] for rel in engine_files(member, root)}
    return member


def member_files(member: Member, root: Path) -> set[str]:
    """The files of one member (relative paths), as export writes them."""
    folder = f"{member.kind}/{member.name}"
    weights_files = {p.relative_to(root).as_posix() for p in member.weights.values()}
    return {f"{folder}/{weights.DESCRIPTION}", f"{folder}/settings.yaml", *weights_files, *engine_files(member, root)}

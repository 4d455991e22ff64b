"""What `detect train`, `evolve` and `predict` share: finding the data, hyp presets, model checks, run layout.

A detect run is a folder <project>/<name>/ holding:

    detect.yaml         the resolved config (with the prepared folder, image size and data YAMLs it used)
    fold<k>/            one Ultralytics run per fold: weights/{best,last}.pt, args.yaml, results.csv, plots;
                        args_start.yaml once it resumed (args.yaml as it was when the fold started)
    pred_oof.csv, pred_test.csv, scores_oof.csv    written by `detect predict`
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from siimcovid.config import CFG_DIR, Config, default_config_path, read_yaml
from siimcovid.data import prepared as prepared_data
from siimcovid.data.prepared import Prepared
from siimcovid.detect.files import FILES
from siimcovid.engine import devices
from siimcovid.utils import LOGGER, SiimError, as_list, atomic_write_text

HYP_DIR = CFG_DIR / "hyp"
RUN_CONFIG = FILES.settings  # the run's settings file (siimcovid.detect.family.FILES)

# Keys of siimcovid/cfg/detect.yaml that go to Ultralytics' trainer under the same name.
TRAIN_KEYS = ("epochs", "imgsz", "batch", "device", "workers", "pretrained", "plots")
# Ultralytics keys siimcovid sets itself (per fold); a user setting them would break skip/resume.
MANAGED_KEYS = {"data", "model", "project", "name", "exist_ok", "resume", "mode", "task", "save_dir", "source"}
# Ultralytics-only settings that do not change what a fold learns (siimcovid's own are config.runtime_keys("detect")):
# a finished or interrupted fold (or tuning run) may differ in them.
ULTRALYTICS_RUNTIME_KEYS = frozenset({"verbose", "cache", "save_period", "exist_ok", "data", "resume"})


def ultralytics_keys() -> set[str]:
    """Every Ultralytics setting (train, val, predict): the keys `detect` passes through."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    return set(DEFAULT_CFG_DICT)


def hyp_presets() -> list[str]:
    return sorted(p.stem for p in HYP_DIR.glob("*.yaml"))


def load_hyp(hyp: str | None) -> dict[str, Any]:
    """A preset by name (siimcovid/cfg/hyp/<name>.yaml) or path -> {ultralytics key: value}."""
    if not hyp:
        return {}
    path = Path(hyp)
    if not path.suffix and not path.exists():
        path = HYP_DIR / f"{hyp}.yaml"
        if not path.is_file():
            raise SiimError(f"unknown hyp preset '{hyp}': shipped presets are {', '.join(hyp_presets())} (or give a YAML path)")
    values = read_yaml(path)
    bad = sorted(set(values) - ultralytics_keys())
    if bad:
        raise SiimError(
            f"{path}: {', '.join(bad)} are not Ultralytics settings (a hyp preset holds keys like lr0, mosaic, mixup)"
        )
    ignored = sorted(set(values) & set(TRAIN_KEYS))
    if ignored:
        LOGGER.warning(f"detect: {path} sets {ignored}; siimcovid takes these from its own config (set them on the command line)")
        values = {k: v for k, v in values.items() if k not in TRAIN_KEYS}
    return values


def passthrough(cfg: Config) -> dict[str, Any]:
    """The Ultralytics settings the user gave beyond siimcovid's own keys (e.g. cos_lr=true)."""
    ours = set(read_yaml(default_config_path("detect"))) | {"mode"}
    extras = {k: v for k, v in cfg.items() if k not in ours}
    managed = sorted(set(extras) & MANAGED_KEYS)
    if managed:
        raise SiimError(f"detect sets {managed} itself (runs go to <project>/<name>/fold<k>, skip and resume are automatic)")
    return extras


def train_args(cfg: Config, hyp: dict[str, Any]) -> dict[str, Any]:
    """Ultralytics train arguments: hyp preset < siimcovid's train keys < pass-through keys the user gave."""
    args = {**hyp, **{k: cfg[k] for k in TRAIN_KEYS}, **passthrough(cfg)}
    args["device"] = devices.ultralytics(args.get("device"))
    return args


def check_model(model: Any, key: str = "model") -> str:
    """A clear error for weights or model YAMLs that do not exist (before Ultralytics tries to download them);
    `key`: the setting that names it (model, pretrained), for the messages."""
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    text = str(model or "")
    path = Path(text)
    if path.suffix == ".pt":
        if path.is_file() or (path.name == text and text in GITHUB_ASSETS_NAMES):
            if path.is_file():
                warn_if_foreign(path, key)
            return text  # a file, or an Ultralytics release name that it downloads (yolov5mu.pt, yolov5xu.pt, ...)
        raise SiimError(
            f"weights not found: {text}. Give a .pt file, or an Ultralytics name such as yolov5mu.pt or yolov5xu.pt "
            "(downloaded once into Ultralytics' weights folder)"
        )
    if path.suffix in {".yaml", ".yml"}:
        if path.is_file():
            return text
        from ultralytics.nn.tasks import yaml_model_load

        try:
            yaml_model_load(text)  # resolves yolov5m.yaml -> Ultralytics' yolov5.yaml at scale m
        except Exception:
            raise SiimError(f"model YAML not found: {text} (Ultralytics ships yolov5n/s/m/l/x.yaml)") from None
        return text
    raise SiimError(f"model must be a .pt weights file or a model .yaml, got '{text}'")


@dataclass
class DataSource:
    """A prepared dataset and its per-fold Ultralytics data YAMLs."""

    prepared: Path
    name: str
    size: int  # side of the square images the YAMLs point to
    n_folds: int
    yamls: dict[int, Path] = field(default_factory=dict)
    only_fold: int | None = None  # set when data= named one fold's YAML

    def yaml(self, fold: int) -> Path:
        path = self.yamls[fold]
        if not path.is_file():
            raise SiimError(
                f"data YAML not found: {path}. `siimcovid prepare` writes data_yaml/<name>_fold<k>.yaml (see data_yaml_dir=)"
            )
        if prepared_of_yaml(path).resolve() != self.prepared:
            raise SiimError(f"{path} points into {prepared_of_yaml(path)}, not {self.prepared}: a stale YAML? re-run prepare")
        return path


def prepared_of_yaml(path: Path) -> Path:
    """The prepared folder a data YAML points into: its `path` is <prepared>/<size>."""
    data = yaml.safe_load(path.read_text()) or {}
    images = Path(str(data.get("path", "")))
    if not images.is_absolute():
        images = (path.parent / images).resolve()
    if not (images.parent / "meta.csv").is_file():
        raise SiimError(
            f"{path}: its path {images} is not inside a prepared dataset (no meta.csv beside it): run `siimcovid prepare`"
        )
    return images.parent


def yaml_task(path: Path) -> str:
    """The task of a data YAML by its one class name: lung (prepare's lung YAMLs) or opacity (any other)."""
    names = (yaml.safe_load(path.read_text()) or {}).get("names")
    names = list(names.values()) if isinstance(names, dict) else names
    return prepared_data.LUNG if names == [prepared_data.LUNG] else "opacity"


def resolve_data(data: Any, data_yaml_dir: str | Path, task: str = "opacity") -> DataSource:
    """data= is a prepared folder, a dataset name (data_yaml/<name>_fold<k>.yaml) or one data YAML path; task=lung:
    the lung detector's YAMLs (<name>_lung_fold<k>.yaml, from prepare lung_boxes=) of that prepared folder."""
    if not data:
        raise SiimError("data= is required: a prepared folder (runs/prepare/<name>) or a data YAML name")
    path, only_fold = Path(data), None
    if path.is_dir():
        prepared = path
    elif path.suffix in {".yaml", ".yml"}:
        if not path.is_file():
            raise SiimError(f"data YAML not found: {path}")
        prepared = prepared_of_yaml(path)
        match = re.fullmatch(r"(.+)_fold(\d+)", path.stem)
        if not match:
            raise SiimError(f"{path}: expected a data YAML named <name>_fold<k>.yaml, as `siimcovid prepare` writes them")
        if yaml_task(path) != task:
            expected = prepared_data.data_yaml_name("<name>", "<k>", task)
            raise SiimError(f"{path} holds {yaml_task(path)} boxes: task={task} trains on a data YAML {expected}")
        only_fold = int(match.group(2))
    elif len(path.parts) > 1:  # a path, not a dataset name
        raise SiimError(f"data folder not found: {path} (run `siimcovid prepare` first)")
    else:
        first = Path(data_yaml_dir) / prepared_data.data_yaml_name(path.name, 0, task)
        if not first.is_file() and (Path(data_yaml_dir) / prepared_data.data_yaml_name(path.name, 0)).is_file():
            first = Path(data_yaml_dir) / prepared_data.data_yaml_name(path.name, 0)  # no lung boxes: said below
        if not first.is_file():
            raise SiimError(f"data '{path.name}' is neither a prepared folder nor a data YAML name: {first} not found")
        prepared = prepared_of_yaml(first)
    prep = Prepared(prepared)
    if "train" not in set(prep.meta.split):
        raise SiimError(f"{prepared} has no train images: detectors need the train split")
    if prep.cfg.get("layout") == "csv":
        raise SiimError(f"{prepared} is a labelled-CSV set (layout=csv): it has no boxes to train a detector on")
    if task == prepared_data.LUNG and prep.lungs() is None:
        raise SiimError(
            f"{prepared} has no lung boxes (no {prepared_data.LUNGS_CSV}): task=lung trains on them; run "
            "`siimcovid prepare ... lung_boxes=<folder of the <image_id>.xml or .txt lung box files>` first"
        )
    size = prep.cfg.get("yolo_size") or max(prep.sizes)
    if only_fold is not None:
        yamls = {only_fold: path}
    else:
        yaml_dir, first = Path(data_yaml_dir), prepared_data.data_yaml_name(prep.name, 0, task)
        recorded = Path(str(prep.cfg.get("data_yaml_dir") or yaml_dir))
        if not (yaml_dir / first).is_file() and (recorded / first).is_file():
            yaml_dir = recorded  # where prepare wrote them
        yamls = {k: yaml_dir / prepared_data.data_yaml_name(prep.name, k, task) for k in range(prep.n_folds)}
    return DataSource(prepared.resolve(), prep.name, size, prep.n_folds, yamls, only_fold)


def select_folds(fold: Any, source: DataSource) -> list[int]:
    """fold=all | k | [k, ...] -> the folds to run (siimcovid.data.prepared.select_folds checks them);
    data=<one fold's YAML> allows that fold only, and fold=all means it."""
    folds = prepared_data.select_folds(fold, source.n_folds, str(source.prepared))
    if source.only_fold is None:
        return folds
    if fold is None or fold == "all":
        return [source.only_fold]
    other = [k for k in folds if k != source.only_fold]
    if other:
        raise SiimError(f"data= names the YAML of fold {source.only_fold}, but fold={other[0]} was asked for")
    return folds


def fold_state(fold_dir: Path) -> str:
    """'new' (nothing trained), 'partial' (interrupted: resume from last.pt) or 'done'.

    Ultralytics strips the optimizer from last.pt (epoch -1) when a training finishes,
    so the checkpoint itself says whether the fold is done.
    """
    from ultralytics.utils.patches import torch_load

    last = Path(fold_dir) / FILES.last
    if not last.is_file():
        return "new"
    try:
        ckpt = torch_load(last, map_location="cpu")
    except Exception as e:  # detect train writes them atomically; the plain yolo CLI (or an old siimcovid) in place
        raise SiimError(
            f"{last} cannot be read ({type(e).__name__}): was the training killed while saving it? "
            f"Delete {fold_dir} to train this fold again"
        ) from None
    epoch = ckpt.get("epoch", -1)
    if epoch < 0 or ckpt.get("optimizer") is None:
        return "done"
    if epoch + 1 >= int((ckpt.get("train_args") or {}).get("epochs", 0)):
        LOGGER.warning(f"detect: {fold_dir} trained every epoch but stopped before its final validation; taking it as done")
        return "done"
    return "partial"


def check_run_dataset(run_dir: Path, source: DataSource) -> None:
    """Refuse to put folds of two different datasets into one run."""
    from siimcovid.rundir import read_run

    saved = run_dir / RUN_CONFIG
    if saved.is_file():
        old = read_run(saved)
        if old.get("prepared") and Path(old["prepared"]) != source.prepared:
            raise SiimError(f"{run_dir} holds a run on {old['prepared']}, not {source.prepared}: choose another name=")
        Prepared(source.prepared).check_folds(old.get("folds_id"), str(run_dir))


def check_ultralytics_settings(extra: dict) -> dict:
    """Ultralytics' own type and range check of the settings detect passes through (one-line errors)."""
    from ultralytics.cfg import check_cfg

    from siimcovid.config import ConfigError

    out = {}
    for key, value in extra.items():
        if isinstance(value, float) and not math.isfinite(value):  # Ultralytics' float keys take inf and nan
            raise ConfigError(f"detect setting {key}={value!r} (an Ultralytics setting): expected a finite number")
        one = {key: value}
        try:
            check_cfg(one)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"detect setting {key}={value!r} (an Ultralytics setting): {e}") from None
        out.update(one)
    return out


def warn_if_foreign(path: Path, key: str) -> None:
    """One warning for a .pt that no siimcovid detect run wrote (as far as a detect.yaml three folders up tells: a
    hint, not a proof): Ultralytics checkpoints are pickles, and loading one runs whatever code it names (a bundle
    carries safetensors instead: siimcovid.weights)."""
    run = Path(path).resolve().parent.parent.parent  # <run>/fold<k>/weights/<name>.pt
    if not (run / RUN_CONFIG).is_file():
        LOGGER.warning(
            f"WARNING: {key}={path} is a pickle (as every Ultralytics .pt is): loading it runs any code it holds; "
            "use only checkpoints you made or trust"
        )


def extra_data_yaml(source: DataSource, fold: int, run_dir: Path, extras: list, crops: list[str] = (), train=None) -> Path:
    """The fold's data YAML with extra training images: `train` = [the fold's list (or `train`: lists of its own, e.g.
    distill='s), a list of the extra images (extra= data, then crop=lung's crops of the fold's training images)]; `val`
    (and test) as prepare wrote them. Written to <run>/data/fold<k>.yaml beside fold<k>_extra.txt."""
    base = yaml.safe_load(source.yaml(fold).read_text()) or {}
    images = [p for e in extras for p in e.detector_images(fold, source.size)] + list(crops)
    missing = [p for p in images if not Path(p).is_file()]
    if missing:
        raise SiimError(f"extra data: {len(missing)} image(s) not found, e.g. {missing[0]}")
    folder = run_dir / "data"
    listed = folder / f"fold{fold}_extra.txt"
    atomic_write_text(listed, "".join(f"{Path(p).resolve()}\n" for p in images))
    root, own = Path(str(base["path"])), train is not None
    if train is None:
        train = [str(root / t) if not Path(t).is_absolute() else t for t in as_list(base["train"])]
    data = {**base, "train": train + ([str(listed.resolve())] if images else [])}
    path = folder / f"fold{fold}.yaml"
    labels = f" (its training images' labels: {', '.join(train)})" if own else ""
    text = f"# Written by `siimcovid detect train`: fold {fold} of {source.prepared}{labels} + {len(images)} extra images.\n"
    atomic_write_text(path, text + yaml.safe_dump(data, sort_keys=False))
    LOGGER.info(f"detect: fold {fold} trains on its {len(list_lines(train))} images + {len(images)} extra ({path})")
    return path


def list_lines(files: list[str]) -> list[str]:
    """The image lines of Ultralytics list files (.txt)."""
    return [line for f in files for line in Path(f).read_text().splitlines() if line.strip()]

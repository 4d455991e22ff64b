"""A model family: what one fold of a model is, registered once (`@register_family(name)`: registry kind
"<stage>_family", detect_family or classify_family, which that stage's `family=` setting takes).

The fold engine (siimcovid.engine.folds) owns everything a family shares: fold selection, skip / resume / refusing
changed settings, `init=` and `extra=`, the temporaries a kill left, serial or Ray dispatch, the device, the done
marker, the run folder's outputs rule, and the per-fold out-of-fold and test prediction loop writing the table
contracts. A family supplies what is its own, by overriding the builders below, in the spirit of Ultralytics'
BaseTrainer (get_model, get_dataloader, ...) and timm's create_model registry:

    open_data()                         -> FoldData: what the run trains on (its folds, fingerprint, sources)
    check(data)                         the family's own checks of the settings, before anything is written
    fold_state(folder)                  -> "new" | "partial" | "done"
    train_fold(job)                     -> the fold's done record (dict); job: Job (fold, folder, callbacks, ...)
    load_fold(data, fold, path, device) -> a model of one fold's checkpoint
    predict_images(model, data, fold, image_ids, split) -> one table (the family's `output` contract)
    join(data, parts, split)            -> the split's result from every fold's part (test: e.g. the mean over folds)
    oof_ids / test_ids, skipped, for_task, start / start_task / stop, report: defaults a family may override
    pack_state, check_description, check_state, from_state: a fold into a bundle (safetensors + a data-only
                                        description) and back (siimcovid.bundle.members.family_kind), or
                                        bundle_kind() -> a member kind of its own (the built-in families')

`output` names the contract its predictions write: "det" (tables.DETECTIONS, the boxes of a detector) or "cls"
(tables.CLASSIFIER_IMAGES, the study probabilities of a classifier), and so its list in `siimcovid fuse`.
Every file a family writes is declared in its `files` (FoldFiles): writer and reader use the declaration.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from siimcovid import registry
from siimcovid.utils import SiimError, atomic_write_text


@dataclass(frozen=True)
class FoldFiles:
    """The files of a family's run folder <project>/<name>/ and of each fold folder fold<k>/ in it.

    settings: the run's settings (<run>/<settings> and, for families that keep a copy, fold<k>/<settings>); the
        record that makes the folder siimcovid's (rundir.is_run_config)
    best / last: a fold's checkpoints, relative to the fold folder (best: what predicts; last: what resumes)
    done: the done marker, a JSON record of the finished fold (best_score, best_epoch, epochs, ...), written last;
        None: the checkpoint itself says so (Ultralytics' last.pt loses its optimizer at the end)
    log: the per-epoch log (results.csv)
    fold: every name (or glob pattern) a training writes in a fold folder: in a user's folder none may exist, and a
        fold started again loses only these
    run: what training and prediction write into the run folder beside the settings
    """

    settings: str
    best: str
    last: str
    done: str | None
    log: str = "results.csv"
    fold: tuple[str, ...] = ()
    run: tuple[str, ...] = ("pred_*.csv", "scores_oof.csv", "predict.yaml")
    tracking: tuple[str, ...] = ("events.out.tfevents.*",)  # TensorBoard's event files (siimcovid.engine.tracking)
    copy_settings: bool = True  # the engine saves the run's settings into each fold folder it trains (its trace)

    @property
    def fold_files(self) -> tuple[str, ...]:
        """Every name of a fold folder a training writes (the declared files, the family's others, tracking's)."""
        named = (self.settings, self.best, self.last, self.log, *((self.done,) if self.done else ()))
        return tuple(dict.fromkeys((*named, *self.fold, *self.tracking)))

    def checkpoint(self, folder: Path, weights: str = "best") -> Path:
        return Path(folder) / (self.best if weights == "best" else self.last)

    def write_done(self, folder: Path, record: dict) -> Path:
        """The done marker: the fold's record, written last and atomically."""
        return atomic_write_text(Path(folder) / self.done, json.dumps(record, indent=1))

    def read_done(self, folder: Path) -> dict | None:
        """The done marker's record, or None when the fold has not finished (or the family has no marker)."""
        path = Path(folder) / self.done if self.done else None
        if path is None or not path.is_file():
            return None
        return json.loads(path.read_text())


@dataclass
class FoldData:
    """What a run trains on, as the family opened it.

    prepared: the prepared folder (siimcovid.data.prepared.Prepared) or None; n_folds and folds (the ones asked
    for); folds_id: the fold fingerprint (None: unknown); name: the default run name; sources: every input path
    (never written into); learned: what the run learns from its data (recorded apart from its settings).
    """

    prepared: Any
    n_folds: int
    folds: list[int]
    folds_id: str | None
    name: str
    sources: list = field(default_factory=list)
    learned: dict = field(default_factory=dict)


@dataclass
class Job:
    """One fold to train: what the engine hands a family's train_fold (it pickles into a Ray task)."""

    fold: int
    folder: Path
    run_dir: Path
    state: str
    callbacks: dict[str, list[Callable]]
    device: Any = None  # the device this fold trains on (engine=ray: the task's)
    record: tuple | None = None  # (settings, learned) of the run, copied into the fold folder when files.copy_settings


    def fire(self, event: str, trainer, *args) -> None:
        """Call the fold's functions of a training event (siimcovid.engine.events), the trainer (or FoldView) first."""
        for fn in self.callbacks.get(event, []):
            fn(trainer, *args)


class FoldView:
    """What the training events see of a fold: what a family with no trainer object of its own hands them."""

    def __init__(self, family: "Family", job: Job, epoch: int = 0):
        self.stage, self.family, self.fold, self.dir = family.stage, family.name, job.fold, job.folder
        self.run_dir, self.project, self.settings = job.run_dir, Path(family.cfg.project), dict(family.cfg)
        self.is_main, self.epoch = family.world.is_main, epoch


class World:
    """A world of one process: the engine's file writes happen here (a family under torchrun supplies its own)."""

    is_main, world, rank = True, 1, 0

    def barrier(self) -> None:
        pass


class Family:
    """The base of every model family (module docstring). Subclasses set the class attributes and override builders."""

    name: str = ""  # its name in the registry (set by register_family)
    stage: str = ""  # the stage whose settings and run folders it uses: "detect" | "classify"
    output: str = ""  # "det" | "cls": the contract its predictions write, its list in `siimcovid fuse`
    files: FoldFiles
    resolve_run_dir: bool = False  # whether the run folder is made absolute (Ultralytics' project= needs it)
    derived: tuple[str, ...] = ()  # learned values that follow from the settings compared (not compared themselves)
    reads_precision = False  # predicts in cfg.precision on the CPU (bf16: siimcovid.engine.devices); else always fp32
    init_path: Path | None = None  # the checkpoint init= names, resolved by the engine (None: no init=)
    crops: bool = False  # whether it trains and predicts crop=lung's views (siimcovid.views); else crop=lung is refused

    def __init__(self, cfg):
        self.cfg = cfg
        self.world = World()
        self.packed: dict = {}  # {weights file of a bundle: (description, sha256)}: engine.folds.predict loads these

    @classmethod
    def for_settings(cls, cfg) -> "Family":
        """The family that trains these settings: this one (a family may hand them to a subclass)."""
        return cls(cfg)

    # ---------------------------------------------------------------- training builders

    def open_data(self) -> FoldData:
        raise NotImplementedError

    def check_init(self, path: Path) -> None:
        """The family's check of an init= checkpoint file (none by default)."""

    def check(self, data: FoldData) -> None:
        """The family's checks of its settings and data, before anything is written (none by default)."""

    def own_fold(self, folder: Path, own_run: bool) -> bool:
        """Whether a fold folder is the family's own (a run of ours: its settings copy, or the family's trace)."""
        from siimcovid.rundir import is_run_config

        return own_run and is_run_config(Path(folder) / self.files.settings)

    def check_resume(self, run_dir: Path, data: FoldData, states: dict[int, str]) -> None:
        """Family checks before folds that trained already are skipped or resumed (none by default)."""

    def callbacks(self, data: FoldData) -> dict:
        """The family's built-in callbacks of these settings (e.g. extra data as on_train_data)."""
        return {}

    def before_folds(self, run_dir: Path, data: FoldData, folds: list[int]) -> dict:
        """After the run's settings are saved, before the first fold: more learned values to record ({} by default)."""
        return {}

    def learned(self, data: FoldData) -> dict:
        """What the run learned from its data, recorded apart from its settings (rundir.write_run)."""
        return {"mode": "train", "family": self.name, **data.learned}

    def run_config(self, data: FoldData):
        """The settings and what the run learned, as one Config: what a fold's trainer reads."""
        from siimcovid.config import Config

        return Config(self.cfg, **self.learned(data))

    def tracking(self) -> dict:
        """The experiment tracking of the settings (`tracking`, `tracking_uri`; siimcovid.engine.tracking)."""
        kind = self.cfg.get("tracking") or "none"
        if kind == "none":
            return {}
        from siimcovid.engine.tracking import tracking_callbacks

        return tracking_callbacks(kind, self.cfg.get("tracking_uri"))

    def fold_state(self, folder: Path) -> str:
        """new | partial | done: by the done marker and the resume checkpoint."""
        if self.files.read_done(folder) is not None:
            return "done"
        return "partial" if (Path(folder) / self.files.last).is_file() else "new"

    def train_fold(self, job: Job) -> dict:
        raise NotImplementedError

    def skipped(self, job: Job) -> Any:
        """What a finished fold's skip returns (its done record)."""
        return self.files.read_done(job.folder)

    def task_device(self, gpus: list[str]):
        """engine=ray: the device inside a fold's task, from the GPUs Ray gave it (Ultralytics' reading)."""
        from siimcovid.engine.devices import in_ray_task

        return in_ray_task(self.cfg.device, gpus)

    def for_task(self) -> "Family":
        """What a Ray task gets (pickled): this family (a family may hand on less, or other settings)."""
        return self

    def start_task(self, device) -> None:
        """Inside a Ray task, before its fold (e.g. join a world of one on the task's device)."""

    def report(self, run_dir: Path, data: FoldData, results: dict) -> None:
        """After the folds: a summary in the log (none by default)."""

    def start(self) -> None:
        """Before anything (e.g. join the torchrun world); `stop` after everything."""

    def stop(self) -> None:
        pass

    # ---------------------------------------------------------------- prediction builders

    def load_fold(self, data, fold: int, path: Path, device) -> Any:
        raise NotImplementedError

    # ---------------------------------------------------------------- bundle builders (siimcovid.bundle.members)

    @classmethod
    def bundle_kind(cls):
        """The family's member kind in a bundle (siimcovid.bundle.members.Kind); None: the generic one
        (members.family_kind) over the four builders below."""
        return None

    def pack_state(self, path: Path) -> tuple[dict, dict]:
        """One fold's checkpoint of a run -> (its tensors, its model's data-only description): what a bundle carries."""
        raise SiimError(f"family={self.name} cannot go into a bundle: it defines no pack_state")

    def check_description(self, desc: dict, where: str) -> dict:
        """A bundle's model.yaml of this family, checked (never trusted: a bundle is a file from elsewhere)."""
        raise SiimError(f"{where}: family={self.name} defines no check_description")

    def check_state(self, desc: dict, shapes: dict, where: str) -> None:
        """The tensors' names and shapes of a fold (from the safetensors header) fit the description."""
        raise SiimError(f"{where}: family={self.name} defines no check_state")

    def from_state(self, state: dict, desc: dict, device) -> Any:
        """A fold's model from a bundle's tensors and description (what load_fold returns for a run's checkpoint)."""
        raise SiimError(f"family={self.name} defines no from_state")

    def use_lungs(self, boxes) -> None:
        """crop=lung with lung boxes handed in (a LungBoxes: a bundle's lung member on new images) instead of lung= read
        from disk; lung_boxes checks them like a lung run's."""
        if not self.crops:
            raise SiimError(f"family={self.name} has no lung-crop views: it cannot take lung boxes")
        self._lungs = boxes

    def lung_boxes(self, folds_id: str | None):
        """crop=lung: the lung boxes its crop views come from (siimcovid.views.LungBoxes, read once), checked on every
        call that gives the model's fold fingerprint (folds_id) to be of the same folds; else None: whole images only."""
        if not hasattr(self, "_lungs"):
            from siimcovid.views import lungs_of

            if (self.cfg.get("crop") or "none") != "none" and not self.crops:
                have = [n for n in registry.names(f"{self.stage}_family") if family_class(n, self.stage).crops]
                raise SiimError(
                    f"crop={self.cfg.crop}: family={self.name} has no lung-crop views ({self.stage} families with them: "
                    f"{', '.join(have)})"
                )
            self._lungs = lungs_of(self.cfg)
        if self._lungs is not None:
            self._lungs.check_folds(folds_id, f"this {self.stage} run")
        return self._lungs

    def oof_ids(self, data, fold: int) -> list[str]:
        """The images fold k's model predicts out of fold: its held-out train images."""
        return list(data.fold(fold, "val").image_id)

    def test_ids(self, data) -> list[str]:
        return list(data.split("test").image_id)

    def predict_images(self, model, data, fold: int, image_ids: list[str], split: str) -> pd.DataFrame:
        raise NotImplementedError

    def join(self, data, parts: list, split: str) -> pd.DataFrame:
        """The split's table from the folds' parts: one after another (a family may average test over folds)."""
        return pd.concat(parts, ignore_index=True)


STAGES = ("detect", "classify")  # the stages whose runs are families' (their kinds: detect_family, classify_family)


def register_family(name: str) -> Callable[[type], type]:
    """Class decorator: register a Family under `name`, in the registry kind of its stage ("<stage>_family")."""

    def wrap(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Family)) or cls.stage not in STAGES or cls.output not in ("det", "cls"):
            raise SiimError(f"family {name}: a Family subclass with stage= detect | classify and output= det | cls")
        cls.name = name
        return registry.register(f"{cls.stage}_family", name)(cls)

    return wrap


def create(cfg, stage: str, default: str) -> Family:
    """The family of a stage's settings (family=, default `default`), built for them."""
    return family_class(cfg.get("family") or default, stage).for_settings(cfg)


def family_class(name: str, stage: str) -> type:
    """The registered family of that name of that stage (one of another stage: an error saying so)."""
    known = registry.names(f"{stage}_family")
    if name not in known:
        other = next((s for s in STAGES if s != stage and name in registry.names(f"{s}_family")), None)
        where = f"a {other} family, not a {stage} one" if other else f"not a {stage} family"
        raise SiimError(f"family={name} is {where} ({stage} families: {', '.join(known)})")
    return registry.get(f"{stage}_family", name)

"""The timm study classifier as a model family (`family=timm`, the default of `siimcovid classify`); multi-label
pretraining on an external labelled set is its subclass (`timm-labels`, siimcovid.classify.pretrain), chosen by
itself when data= is one.

What is its own: the data (a prepared folder's folds), one fold's training (siimcovid.classify.train.FoldTrainer,
under torchrun one process per GPU), its files (FILES), its TTA (the horizontal mirror) and its predictions
(tables.CLASSIFIER_IMAGES). The fold engine (siimcovid.engine.folds) does the rest. task=none is the same family
trained as a binary none model (siimcovid.classify.none: its trainer, checkpoint rule and report).
"""

from __future__ import annotations

from pathlib import Path

from siimcovid.classify.files import FILES
from siimcovid.config import Config
from siimcovid.engine.family import Family, FoldData, Job, register_family
from siimcovid.utils import LOGGER, SiimError


@register_family("timm")
class TimmFamily(Family):
    stage, output, files = "classify", "cls", FILES
    crops = True  # crop=lung: each image also seen cropped to its lungs (classify.predict.Views); training adds crops
    reads_precision = True  # classify.predict.run_inference: amp_dtype_for(device, amp, precision)

    def start(self) -> None:
        from siimcovid.classify.dist import setup

        self.d = self.world = setup(self.cfg.device)

    def start_task(self, device) -> None:
        from siimcovid.classify.dist import setup

        self.d = self.world = setup(device)

    def stop(self) -> None:
        from siimcovid.classify.dist import cleanup

        if getattr(self, "d", None) is not None:
            cleanup(self.d)

    def task_device(self, gpus: list[str]) -> str:
        """Ray sets the task's CUDA_VISIBLE_DEVICES: its GPU is cuda:0 here."""
        from siimcovid.engine.devices import parse

        return "cpu" if parse(self.cfg.device).count == 0 or not gpus else "cuda"

    def labels(self) -> bool:
        return False

    @classmethod
    def for_settings(cls, cfg) -> Family:
        """timm with data= an external labelled set (layout rsna or csv) is multi-label pretraining, timm-labels."""
        from siimcovid.data.extra import multilabel_layout
        from siimcovid.engine.family import family_class

        if cls.name == "timm" and cfg.get("data") and Path(cfg.data).is_dir() and multilabel_layout(cfg.data):
            return family_class("timm-labels", "classify")(cfg)
        return cls(cfg)

    @classmethod
    def bundle_kind(cls):
        """A member of a bundle: siimcovid.bundle.members.KINDS["classify"] (safetensors + a checked description)."""
        from siimcovid.bundle.members import KINDS

        return KINDS["classify"]

    def open_data(self) -> FoldData:
        from siimcovid.classify.train import check_config, run_name
        from siimcovid.data.prepared import Prepared

        cfg = self.cfg
        prep = Prepared(cfg.data)
        size = prep.check_size(cfg.imgsz)
        folds = prep.select_folds(cfg.fold)
        check_config(cfg)
        name = run_name(cfg, self.labels())
        cfg.data, cfg.imgsz = str(Path(cfg.data).resolve()), size
        if cfg.get("lung"):  # recorded as an absolute path, like data=
            cfg.lung = str(Path(cfg.lung).resolve())
        self.prep, self.size = prep, size
        return FoldData(prep, prep.n_folds, folds, prep.folds_id, name, [cfg.data], {"folds_id": prep.folds_id})

    def check(self, data: FoldData) -> None:
        from siimcovid.classify.data import check_files
        from siimcovid.classify.none import check_task

        check_task(self.cfg, self.labels())  # task=none: the binary none model (siimcovid.classify.none)
        prep = self.prep
        masks = not self.labels() or bool((prep.meta.n_boxes > 0).any())
        check_files(prep, prep.split("train").assign(split="train"), self.size, masks=masks)
        self.check_views(data)
        if self.cfg.get("distill"):  # the teachers checked and recorded (siimcovid.classify.distill)
            from siimcovid.classify.distill import prepare_run

            if self.labels():
                raise SiimError("distill=: multi-label pretraining (an external labelled set) has no study targets to distill")
            self.teachers = prepare_run(self.cfg, prep, data.folds, data)

    def check_views(self, data: FoldData) -> None:
        """crop=lung: the lung run is readable, of these folds, with the out-of-fold boxes that training crops with
        (before anything is written)."""
        if (self.cfg.get("crop") or "none") == "none":
            return
        if self.labels():
            raise SiimError("crop=lung: multi-label pretraining (an external labelled set) has no lung crops; use crop=none")
        lungs = self.lung_boxes(data.folds_id)
        if "oof" not in lungs.tables:
            where = lungs.source
            raise SiimError(f"lung={where} has no out-of-fold boxes (pred_oof.csv): `siimcovid detect predict run={where}`")

    def callbacks(self, data: FoldData) -> dict:
        """extra=: the extra folders' images join each fold's training data (on_train_data)."""
        from siimcovid.classify.none import is_none_task
        from siimcovid.classify.none_trainer import none_ap_improved
        from siimcovid.classify.train import extra_data_hook
        from siimcovid.data.extra import open_extra

        hooks = {"is_better": [none_ap_improved]} if is_none_task(self.cfg) else {}  # task=none: best.pt by AP(none)
        data_hooks = []
        if self.cfg.extra:
            dedup = (self.prep, int(self.cfg.imgsz), self.cfg.dedup, int(self.cfg.dedup_distance), self.run_dir)
            data_hooks.append(extra_data_hook(self.cfg, open_extra(self.cfg.extra, self.prep.folds_id, self.prep.n_folds, dedup)))
        if getattr(self, "teachers", None):  # distill=: after extra=, the fold's own images get the teachers' soft targets
            from siimcovid.classify.distill import distill_hook

            data_hooks.append(distill_hook(self.teachers))
        return hooks | ({"on_train_data": data_hooks} if data_hooks else {})

    def before_folds(self, run_dir: Path, data: FoldData, folds: list[int]) -> dict:
        self.saved = self.run_config(data)
        self.run_dir = Path(run_dir)  # where extra='s copies CSVs go (callbacks)
        return {}

    def for_task(self) -> "TimmFamily":
        """A Ray task always resumes: resume=false cleared the folds once, before the tasks (a task run again must
        resume what its dead attempt left, not restart)."""
        task = type(self)(Config({**self.cfg, "resume": True}))
        task.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("cfg", "d", "world")})
        task.saved = Config({**self.saved, "resume": True})
        return task

    def trainer_class(self):
        from siimcovid.classify.none import is_none_task
        from siimcovid.classify.none_trainer import NoneTrainer
        from siimcovid.classify.train import FoldTrainer

        return NoneTrainer if is_none_task(self.cfg) else FoldTrainer

    def train_fold(self, job: Job) -> dict:
        folder, d = job.folder, self.d
        init = self.init_path
        return self.trainer_class()(self.saved, self.prep, job.fold, self.size, folder, d, job.callbacks, init).run()

    def report(self, run_dir: Path, data: FoldData, results: dict) -> None:
        from siimcovid.classify.none import is_none_task
        from siimcovid.classify.none_trainer import report_oof_none
        from siimcovid.classify.train import report_oof

        if self.d.is_main:
            (report_oof_none if is_none_task(self.cfg) else report_oof)(self.prep, run_dir)

    # ---------------------------------------------------------------- prediction (siimcovid.classify.predict.Source)

    def load_fold(self, src, fold: int, path: Path, device):
        from siimcovid.classify.predict import fold_model

        return fold_model(src, path)

    def oof_ids(self, src, fold: int) -> list[str]:
        return list(src.prep.fold(fold, "val").image_id)

    def test_ids(self, src) -> list[str]:
        return list(src.prep.split("test").image_id)

    def predict_images(self, model, src, fold: int, image_ids: list[str], split: str):
        """One fold's model on its held-out (split train) or test images; crop=lung: each also seen cropped to the
        lungs by fold k's lung windows (src.how.views; siimcovid.classify.predict.with_crop_views)."""
        from siimcovid.classify.predict import predict_fold

        return predict_fold(model, src, fold, split)

    def join(self, src, parts: list, split: str):
        """oof: the folds' image tables one after another; test: (the test table, [(fold, study, none)]) for the
        caller to average (mean_over_folds) or keep per fold (each_fold)."""
        import pandas as pd

        if split == "oof":
            return pd.concat(parts, ignore_index=True)
        return src.test_loader()[0], parts


@register_family("timm-labels")
class TimmLabelsFamily(TimmFamily):
    """Multi-label pretraining (module docstring): the study classifier's family, over an external set's labels."""

    def labels(self) -> bool:
        return True

    def trainer_class(self):
        from siimcovid.classify.pretrain import LabelTrainer

        return LabelTrainer

    def open_data(self) -> FoldData:
        from siimcovid.data.extra import ExtraData, multilabel_layout

        data = super().open_data()
        root = self.prep.root
        if not multilabel_layout(root):
            raise SiimError(f"family=timm-labels pretrains on an external labelled set (layout rsna or csv), not {root}")
        if self.cfg.extra:
            raise SiimError(f"extra= adds SIIM targets to a SIIM run; {root} is an external set (multi-label pretraining)")
        names = ExtraData(root).label_names
        if not names:
            raise SiimError(f"{root}/prepare.yaml names no label_names: nothing to pretrain on")
        data.learned["label_names"] = list(names)
        masks = "with the mask head on its boxes" if ExtraData(root).layout == "rsna" else "no mask loss (no boxes)"
        LOGGER.info(
            f"classify: multi-label pretraining on {root.name}: {len(names)} labels ({', '.join(names)}), BCE with unknown "
            f"labels left out, {masks}; best.pt by the mean validation ROC AUC. Then: classify train data=<SIIM> init=<this run>"
        )
        return data

    def callbacks(self, data: FoldData) -> dict:
        from siimcovid.classify.pretrain import auc_improved

        return {"is_better": [auc_improved]}

    def report(self, run_dir: Path, data: FoldData, results: dict) -> None:
        from siimcovid.classify.pretrain import report_oof_labels

        if self.d.is_main:
            report_oof_labels(self.prep, run_dir)

"""A whole model family in one small module, with no edit anywhere else: each fold "learns" its training images'
class frequencies and predicts them for every image (a per-image constant). The fold engine does the rest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from siimcovid.classify.data import image_table
from siimcovid.classify.predict import image_frame
from siimcovid.data.prepared import Prepared
from siimcovid.engine.family import Family, FoldData, FoldFiles, FoldView, Job, register_family
from siimcovid.tables import STUDY_CLASSES
from siimcovid.utils import SiimError


@register_family("constant")
class ConstantFamily(Family):
    stage, output = "classify", "cls"
    files = FoldFiles(settings="classify.yaml", best="prior.json", last="prior.json", done="done.json")

    def open_data(self) -> FoldData:
        prep = self.prep = Prepared(self.cfg.data)
        learned = {"folds_id": prep.folds_id, "family": self.name}
        return FoldData(prep, prep.n_folds, prep.select_folds(self.cfg.fold), prep.folds_id, "constant", [prep.root], learned)

    def train_fold(self, job: Job) -> dict:
        view = FoldView(self, job, epoch=1)
        job.fire("on_train_start", view)
        train = image_table(self.prep, "train", job.fold, "train")
        study = np.bincount(train.label, minlength=len(STUDY_CLASSES)) / len(train)
        (job.folder / self.files.best).write_text(json.dumps({"study": study.tolist(), "none": float(train.none.mean())}))
        record = {"fold": job.fold, "best_score": float(study.max()), "best_epoch": 1, "epochs": 1}
        job.fire("on_fit_epoch_end", view, {"epoch": 1, "train_majority": float(study.max())})
        self.files.write_done(job.folder, record)  # last: the fold is finished
        job.fire("on_train_end", view, record)
        return record

    def load_fold(self, data, fold: int, path: Path, device) -> dict:
        return json.loads(Path(path).read_text())

    # a bundle: the engine packs, checks and loads the tensors these give (siimcovid.bundle.members.family_kind)
    def pack_state(self, path: Path) -> tuple[dict, dict]:
        prior = self.load_fold(None, 0, path, None)
        return {"study": torch.tensor(prior["study"]), "none": torch.tensor([prior["none"]])}, {}

    def check_description(self, desc: dict, where: str) -> dict:
        if desc:
            raise SiimError(f"{where}: a constant model is described by its family alone, not {sorted(desc)}")
        return desc

    def check_state(self, desc: dict, shapes: dict, where: str) -> None:
        if shapes != {"study": (len(STUDY_CLASSES),), "none": (1,)}:
            raise SiimError(f"{where}: not a constant model's tensors ({shapes})")

    def from_state(self, state: dict, desc: dict, device) -> dict:
        return {"study": state["study"].tolist(), "none": float(state["none"][0])}

    def predict_images(self, model, data, fold: int, image_ids: list[str], split: str) -> pd.DataFrame:
        table = image_table(data, split, fold, "val") if split == "train" else image_table(data, "test")
        table = table.set_index("image_id").loc[image_ids].reset_index()
        study = np.tile(model["study"], (len(table), 1))
        return image_frame(table, study, np.full(len(table), model["none"]), self.name)

    def join(self, data, parts: list[pd.DataFrame], split: str) -> pd.DataFrame:
        table = pd.concat(parts, ignore_index=True)
        if split == "oof":
            return table
        mean = table.groupby(["model", "image_id", "study_id"], sort=False)[[*STUDY_CLASSES, "none"]].mean()
        return mean.reset_index().assign(fold=-1)[table.columns]

"""The prepared dataset: the folder `siimcovid prepare` writes and every later stage reads.

Layout of <out> (default runs/prepare/<name>)::

    prepare_files.yaml                   prepare's record: every file it wrote here (siimcovid.outputs)
    prepare.yaml                         the resolved prepare config
    meta.csv                             one row per image, train and test (columns: siimcovid.tables.META)
    skipped.csv                          inputs dropped with on_error=skip (columns: siimcovid.tables.SKIPPED)
    <size>/images/{train,test}/<image_id>.<ext>   8-bit square images
    <size>/labels/train/<image_id>.txt   YOLO labels: `0 xc yc w h`, normalised, clipped
    <size>/masks/train/<image_id>.png    0/255 masks with the opacity boxes filled
    <size>/fold<k>_train.txt, fold<k>_val.txt, test.txt   image lists for Ultralytics
    lungs.csv                            with lung_boxes=: one lung box per train image (siimcovid.tables.LUNG_BOXES)
    <size>/lung/images/{train,test}/<image_id>.<ext>   with lung_boxes=: links to the prepared images (Ultralytics
                                         finds a label by the image's path: /images/ -> /labels/)
    <size>/lung/labels/train/<image_id>.txt, <size>/lung/fold<k>_{train,val}.txt, test.txt   the lung detector's
                                         one-class YOLO dataset (data_yaml/<name>_lung_fold<k>.yaml)

meta.csv is written last: a folder without it is not a finished prepare.
Coordinates in meta.csv are ORIGINAL DICOM pixels; an image of size s is the original
resized to s x s, so a box maps back with x * cols / s, y * rows / s.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import yaml

from siimcovid.data.prepared_paths import image_file, label_file, mask_file
from siimcovid.tables import LUNG_BOXES, META, SKIPPED
from siimcovid.utils import SiimError, as_list

SKIPPED_CSV = "skipped.csv"  # written by prepare only when it dropped inputs (on_error=skip)
RECORD = "prepare_files.yaml"  # prepare's record of its folder (siimcovid.outputs): prepare.yaml stays a valid cfg=
LUNGS_CSV = "lungs.csv"  # the lung boxes (prepare lung_boxes=)
LUNG = "lung"  # the lung detector's task, its YOLO dataset's folder <size>/lung/ and its one class name


def data_yaml_name(name: str, fold: int, task: str = "opacity") -> str:
    """The data YAML prepare writes for a fold: <name>_fold<k>.yaml (opacity), <name>_lung_fold<k>.yaml (lung)."""
    return f"{name}_lung_fold{fold}.yaml" if task == LUNG else f"{name}_fold{fold}.yaml"


def folds_fingerprint(meta: pd.DataFrame) -> str:
    train = meta[meta.split == "train"]
    text = "\n".join(sorted(f"{i}:{int(f)}" for i, f in zip(train.image_id, train.fold)))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def select_folds(fold, n_folds: int, where: str = "the prepared data") -> list[int]:
    """fold=all (or None) | k | [k, ...] -> sorted distinct folds, each checked to be in 0..n_folds-1."""
    if fold is None or str(fold).lower() == "all":
        return list(range(n_folds))
    out = set()
    for f in as_list(fold):
        if isinstance(f, bool) or not isinstance(f, (int, float, str)) or not str(f).lstrip("-").isdigit():
            raise SiimError(f"fold must be all, a fold number or a list of them, got '{fold}'")
        k = int(f)
        if not 0 <= k < n_folds:
            raise SiimError(f"fold {k} does not exist: {where} has folds 0..{n_folds - 1}")
        out.add(k)
    return sorted(out)


class Prepared:
    """Read access to a prepared folder: config, meta table and file paths."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        meta_path, cfg_path = self.root / "meta.csv", self.root / "prepare.yaml"
        if not meta_path.is_file() or not cfg_path.is_file():
            raise SiimError(f"{self.root} is not a finished prepared dataset (no meta.csv): run `siimcovid prepare` first")
        self.cfg = self.read_cfg(self.root)
        meta = META.read(meta_path)
        for c in META.columns:  # a column added since (the DICOM tags checked): '' in a folder an earlier prepare wrote
            if not c.required and c.name not in meta.columns:
                meta[c.name] = ""
        self.meta = meta[META.names].reset_index(drop=True)

    @staticmethod
    def read_cfg(root: str | os.PathLike) -> dict:
        """The settings prepare saved (prepare.yaml): sizes, n_folds, data_resolved..."""
        from siimcovid.rundir import merge_run

        return merge_run(yaml.safe_load((Path(root) / "prepare.yaml").read_text()) or {})

    @property
    def name(self) -> str:
        return self.cfg["name"]

    @property
    def sizes(self) -> list[int]:
        return list(self.cfg["sizes"])

    @property
    def ext(self) -> str:
        """The image format (cfg/prepare.yaml ext): a prepare.yaml that says anything else is refused (image names
        are <id>.<ext>, written by pseudo and distill= too)."""
        ext = self.cfg.get("ext")
        if ext not in ("png", "jpg"):
            raise SiimError(f"{self.root / 'prepare.yaml'}: ext={ext!r} is not png or jpg")
        return ext

    @property
    def n_folds(self) -> int:
        return int(self.cfg["n_folds"])

    @property
    def folds_id(self) -> str:
        """A fingerprint of the fold assignment (which train image is in which fold).

        Every stage that trains per fold records it, and refuses to resume, skip or predict
        when it changed: a model must never predict, as "out-of-fold", images it trained on.
        """
        return folds_fingerprint(self.meta)

    def check_folds(self, recorded: str | None, what: str) -> None:
        """Raise if `what` was trained on other folds than this prepared folder has now."""
        if recorded and recorded != self.folds_id:
            raise SiimError(
                f"{what} was trained on other folds than {self.root} has now (prepare re-ran with other data or seed): "
                f"its out-of-fold predictions would include images it trained on. Train it again under a new name="
            )

    def check_size(self, size: int) -> int:
        size = int(size)
        if size not in self.sizes:
            raise SiimError(
                f"{self.root} has images at sizes {self.sizes}, not {size}: re-run prepare with sizes={self.sizes + [size]}"
            )
        return size

    def check_fold(self, fold: int) -> int:
        if not 0 <= int(fold) < self.n_folds:
            raise SiimError(f"fold {fold} does not exist: {self.root} has folds 0..{self.n_folds - 1}")
        return int(fold)

    def select_folds(self, fold) -> list[int]:
        """fold=all | k | [k, ...] (the `fold` setting of every stage) -> the folds, each checked to exist."""
        return select_folds(fold, self.n_folds, str(self.root))

    @property
    def skipped_path(self) -> Path:
        return self.root / SKIPPED_CSV

    def skipped(self) -> pd.DataFrame:
        """The inputs prepare dropped (tables.SKIPPED: file, line, problem); no rows when it dropped none."""
        return SKIPPED.read(self.skipped_path) if self.skipped_path.is_file() else SKIPPED.empty()

    def was_skipped(self, image_id: str) -> bool:
        """Whether prepare dropped this image: a row of skipped.csv names it (in its file or its problem)."""
        rows = self.skipped()
        names = rows["file"].str.contains(image_id, regex=False) | rows["problem"].str.contains(image_id, regex=False)
        return bool(names.any())

    def lungs(self) -> pd.DataFrame | None:
        """The lung boxes prepare read (tables.LUNG_BOXES: one box per train image, original pixels); None when it was
        given no lung_boxes=."""
        path = self.root / LUNGS_CSV
        return LUNG_BOXES.read(path) if path.is_file() else None

    def split(self, split: str) -> pd.DataFrame:
        return self.meta[self.meta.split == split].reset_index(drop=True)

    def fold(self, fold: int, part: str = "val") -> pd.DataFrame:
        """Train images of a fold: part='val' (held out) or 'train' (the other folds)."""
        fold = self.check_fold(fold)
        train = self.split("train")
        return train[(train.fold == fold) if part == "val" else (train.fold != fold)].reset_index(drop=True)

    def image_path(self, image_id: str, split: str, size: int) -> Path:
        return image_file(self.root, size, split, image_id, self.ext)

    def mask_path(self, image_id: str, size: int) -> Path:
        return mask_file(self.root, size, image_id)

    def label_path(self, image_id: str, size: int) -> Path:
        return label_file(self.root, size, image_id)

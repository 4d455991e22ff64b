"""Extra training data: prepared folders that add images to every fold's TRAINING data, never to a validation list.

`detect train ... extra=<dir>[,<dir>]` and `classify train ... extra=<dir>[,...]` read each folder with ExtraData:

    layout rsna     (prepare layout=rsna): every train image, its boxes (YOLO labels, masks) as SIIM's; study classes
                    unknown, none = no box
    layout csv      (prepare layout=csv): the label columns that are SIIM targets (negative, typical, indeterminate,
                    atypical, none) in labels.csv; no boxes (detectors refuse it)
    layout pseudo   (siimcovid pseudo): fold k's student takes fold k's teacher's labels (soft study probabilities,
                    none, confident boxes and masks); refused unless the folder's folds_id is the student's
    layout folder   unlabelled images: refused (make pseudo-labels from it first with `siimcovid pseudo`)

A SIIM-layout folder is refused: its images are in the folds already. An external set (rsna, csv) can hold SIIM train
or test images under other ids (the SIIM images were drawn from public sets): with `dedup=drop` (the default) they are
left out of every fold's training data and listed in the run folder's copies_<folder>.csv (siimcovid.data.dedup);
`dedup=refuse` stops, `dedup=keep` does not check. A pseudo folder was checked when `siimcovid pseudo` made it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.data.prepared import Prepared
from siimcovid.tables import EXTERNAL_LABELS, PSEUDO_LABELS, STUDY_CLASSES
from siimcovid.utils import LOGGER, DataError, SiimError

TARGETS = STUDY_CLASSES + ["none"]  # the SIIM targets of classifier_rows, in this order
ROW_COLUMNS = ["image", "mask"] + TARGETS
LABELS_CSV = "labels.csv"
EXTERNAL = ("rsna", "csv")  # labelled external layouts: prepared folders with folds of their own


def read_prepare_yaml(root: Path) -> dict:
    if not (root / "prepare.yaml").is_file():
        raise SiimError(f"extra data {root}: no prepare.yaml, not a prepared folder (`siimcovid prepare` or `siimcovid pseudo`)")
    return Prepared.read_cfg(root)


class ExtraData:
    """One prepared folder of extra training data (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.cfg = read_prepare_yaml(self.root)
        self.layout = str(self.cfg.get("layout") or "siim")
        if self.layout == "siim":
            raise SiimError(f"extra data {self.root} is a SIIM prepared folder: its images are in the folds already")
        if self.layout == "folder":
            raise SiimError(f"extra data {self.root} holds unlabelled images: make pseudo-labels of it with `siimcovid pseudo`")
        if self.layout == "pseudo":
            self.labels = PSEUDO_LABELS.read(self.root / LABELS_CSV)
        elif self.layout in EXTERNAL:
            self.prep = Prepared(self.root)
            self.label_names = list(self.cfg.get("label_names") or (["opacity"] if self.layout == "rsna" else []))
        else:
            raise SiimError(f"extra data {self.root}: unknown layout '{self.layout}' (expected rsna, csv or pseudo)")

        self.copies: set[str] = set()  # its train images that are SIIM images (drop_siim_copies): never trained on

    def __repr__(self) -> str:
        return f"ExtraData({self.root}, layout={self.layout})"

    def copies_path(self, out_dir: Path) -> Path:
        return Path(out_dir) / f"copies_{self.root.name}.csv"

    def drop_siim_copies(self, data: Prepared, size: int, mode: str, max_distance: int, out_dir: Path, siim=None) -> None:
        """An external set's train images whose pixels are a SIIM train or test image's (siimcovid.data.dedup), at the
        size the run trains: drop: left out of every fold (listed in out_dir/copies_<folder>.csv, tables.COPIES); refuse:
        an error naming them; keep, and a pseudo folder (`siimcovid pseudo` checked its pool): unchecked. siim: the SIIM
        images' dedup.siim_hashes, when open_extra has them from another folder."""
        if mode == "keep" or self.layout not in EXTERNAL:
            return
        from siimcovid.data.dedup import check_pool, siim_copies
        from siimcovid.tables import COPIES

        self.check_size(size)
        copies = siim_copies(self.prep, data, size, max_distance, pool_split="train", siim=siim)
        listed = self.copies_path(out_dir)
        check_pool(copies, str(self.root), "extra images", len(self.prep.split("train")), mode, max_distance, listed)
        COPIES.write(copies, listed)
        self.copies = set(copies.image_id)

    def own_train(self) -> pd.DataFrame:
        """The external set's train rows less the SIIM copies (drop_siim_copies)."""
        train = self.prep.split("train")
        return train[~train.image_id.isin(self.copies)] if self.copies else train

    # ---------------------------------------------------------------- checks

    def check_student(self, folds_id: str, n_folds: int) -> None:
        """A pseudo-label folder serves the students of the SIIM folds its teachers were trained on, no others."""
        if self.layout != "pseudo":
            return
        own = self.cfg.get("folds_id")
        if own != folds_id:
            raise SiimError(
                f"extra data {self.root}: its pseudo-labels come from teachers trained on other folds (folds_id {own}) than "
                f"the prepared data this run trains on ({folds_id}): fold k's student would learn from a teacher that saw "
                "fold k's validation images. Make the pseudo-labels again with teachers of these folds"
            )
        folds = sorted(set(self.labels.fold))
        if folds != [-1] and folds != list(range(n_folds)):
            raise SiimError(f"extra data {self.root}: pseudo-labels of teacher folds {folds}, the run has folds 0..{n_folds - 1}")

    def teacher_fold(self, fold: int) -> int:
        """The teacher fold whose labels fold k's student takes: k, or -1 (the all-folds teacher, which leaks)."""
        folds = set(self.labels.fold)
        if fold in folds:
            return fold
        if folds == {-1}:
            LOGGER.warning(
                f"WARNING: extra data {self.root}: the all-folds teacher's pseudo-labels saw every fold's validation "
                f"images: fold {fold}'s out-of-fold scores are optimistic (fit for final test-time students only)"
            )
            return -1
        raise SiimError(f"extra data {self.root} has no pseudo-labels of teacher fold {fold}")

    def check_size(self, size: int) -> None:
        sizes = [int(s) for s in self.cfg.get("sizes") or []]
        if int(size) not in sizes:
            raise SiimError(f"extra data {self.root} has images at sizes {sizes}, not {size}: prepare it with sizes={size}")

    # ---------------------------------------------------------------- detector

    def detector_images(self, fold: int, size: int) -> list[Path]:
        """Image files for fold k's detector training list; their YOLO labels sit at the Ultralytics path."""
        self.check_size(size)
        if self.layout == "pseudo":
            k = self.teacher_fold(fold)
            listed = self.root / str(size) / f"fold{k}.txt"
            if not listed.is_file():
                raise SiimError(f"extra data {self.root}: no detector list {listed}")
            return [Path(line.strip()) for line in listed.read_text().splitlines() if line.strip()]
        if self.layout != "rsna":
            raise SiimError(f"extra data {self.root} (layout {self.layout}) has no boxes: detectors take rsna or pseudo folders")
        train = self.own_train()
        return [self.prep.image_path(i, "train", size).resolve() for i in train.image_id]

    # ---------------------------------------------------------------- classifier

    def classifier_rows(self, fold: int, size: int) -> pd.DataFrame:
        """image, mask (path or None), negative, typical, indeterminate, atypical, none: soft targets, NaN = unknown."""
        self.check_size(size)
        if self.layout == "pseudo":
            rows = self.pseudo_rows(fold, size)
        else:
            rows = self.external_rows(size)
        if rows.empty and self.copies:
            raise SiimError(
                f"extra data {self.root}: all of its {len(self.copies)} images are SIIM images' copies (dedup=drop): nothing "
                "to add. If they are not (a synthetic set: its images share one template), dedup=keep"
            )
        if rows[TARGETS].isna().all().all():
            raise SiimError(
                f"extra data {self.root} (labels {getattr(self, 'label_names', [])}) has none of the classifier's targets "
                f"{TARGETS}: pretrain on it instead (`classify train data={self.root}`, then init=)"
            )
        return rows.reset_index(drop=True)

    def pseudo_rows(self, fold: int, size: int) -> pd.DataFrame:
        k = self.teacher_fold(fold)
        labels = self.labels[self.labels.fold == k]
        folder = self.root / str(size) / f"fold{k}"
        ext = self.cfg.get("ext", "png")
        masks = [folder / "masks" / f"{i}.png" for i in labels.image_id]
        return pd.DataFrame(
            {
                "image": [folder / "images" / f"{i}.{ext}" for i in labels.image_id],
                "mask": [m if m.is_file() else None for m in masks],  # confident images only; elsewhere masked out
                **{c: labels[c].to_numpy(dtype=np.float64) for c in TARGETS},
            }
        )

    def external_rows(self, size: int) -> pd.DataFrame:
        train = self.own_train()
        out = pd.DataFrame({"image": [self.prep.image_path(i, "train", size) for i in train.image_id]})
        for c in TARGETS:
            out[c] = np.nan
        if self.layout == "rsna":  # boxes known: the mask and none are targets; the study class is not
            out["mask"] = [self.prep.mask_path(i, size) for i in train.image_id]
            out["none"] = (train.n_boxes.to_numpy() == 0).astype(np.float64)
            return out[ROW_COLUMNS]
        out["mask"] = None
        labels = self.label_table().set_index("image_id").reindex(train.image_id)
        for c in TARGETS:
            if c in labels:
                out[c] = labels[c].to_numpy(dtype=np.float64)
        return out[ROW_COLUMNS]

    # ---------------------------------------------------------------- multi-label pretraining

    def label_table(self) -> pd.DataFrame:
        """image_id, then one float column per label name (NaN = unknown): rsna from its boxes, csv from labels.csv."""
        path = self.root / LABELS_CSV
        if self.layout == "rsna" and not path.is_file():
            train = self.prep.split("train")
            return pd.DataFrame({"image_id": train.image_id, "opacity": (train.n_boxes > 0).astype(np.float64)})
        if self.layout not in EXTERNAL:
            raise SiimError(f"{self.root} (layout {self.layout}) has no label space of its own")
        if not self.label_names:
            raise SiimError(f"{self.root}/prepare.yaml names no label_names")
        table = EXTERNAL_LABELS.read(path)
        missing = [n for n in self.label_names if n not in table.columns]
        if missing:
            raise DataError(f"no column(s) {missing} of prepare.yaml's label_names", path)
        return table[["image_id"] + self.label_names]


def extra_roots(extra) -> list[Path]:
    """The `extra` setting (a list of folders) -> resolved paths, each checked to exist."""
    roots = [Path(p) for p in (extra or [])]
    for p in roots:
        if not p.is_dir():
            raise SiimError(f"extra data folder not found: {p}")
    return [p.resolve() for p in roots]


def open_extra(extra, folds_id: str, n_folds: int, dedup: tuple | None = None) -> list[ExtraData]:
    """Every folder of `extra=`, read and checked against the SIIM prepared data the run trains on.
    dedup: (data: Prepared, size, mode, max_distance, out_dir): each external set's SIIM copies (drop_siim_copies)."""
    out = [ExtraData(p) for p in extra_roots(extra)]
    names = [e.root.name for e in out]
    for e in out:
        e.check_student(folds_id, n_folds)
    if dedup is None or dedup[2] == "keep":
        return out
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        raise SiimError(f"extra data: two folders named {twice[0]} (their copies CSVs would share a name): rename one")
    from siimcovid.data.dedup import siim_hashes

    data, size, siim = dedup[0], dedup[1], None
    for e in out:
        if e.layout in EXTERNAL:
            e.check_size(size)
            if siim is None and size in data.sizes:
                siim = siim_hashes(data, size)  # once for every external set (without the size: siim_copies says so)
        e.drop_siim_copies(*dedup, siim=siim)
    return out


def multilabel_layout(root: str | Path) -> bool:
    """Whether a prepared folder is a labelled external set (classify then pretrains multi-label on it)."""
    return str(Prepared.read_cfg(root).get("layout") or "siim") in EXTERNAL

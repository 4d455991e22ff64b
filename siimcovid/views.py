"""Views of an image (`crop=lung`): the whole prepared image, and the same image cropped to its lungs, as the 1st
place looked at every image twice. Every model family predicts each view; the views are then fused like folds and TTA.

The crop of an image in fold k's model comes from the lung detector of the same fold (a `detect train task=lung` run):
out of fold, fold k's lung model on fold k's held-out images (its pred_oof.csv rows of fold k), on test images fold k's
lung model (its pred_test.csv rows of fold k), so no view leaks what another fold learned. The window is the lung box of
highest confidence at or above `lung_conf`, widened by `crop_margin` of its size on each side and clipped to the image;
an image with no confident lung box has no crop (its crop view is the whole image).

Coordinates: a window is in ORIGINAL pixels (x0, y0, x1, y1) (meta.csv's rows and cols). The model sees that window of
the prepared s x s image (the window times s / cols, s / rows, rounded outwards to whole pixels), resized to its input;
a box it finds in the crop's pixels maps back to original pixels exactly through the crop's own window
(window_of_crop: the whole pixels cut, in original coordinates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from siimcovid.tables import BOX_COLUMNS, DETECTIONS
from siimcovid.utils import SiimError, file_sha256

Window = tuple[float, float, float, float]

# the settings that turn a lung box into a window and the views into one, per stage (cfg/shared.yaml, cfg/<stage>.yaml)
VIEW_KEYS = {
    "detect": ("crop_margin", "lung_conf", "view_fusion", "view_iou"),
    "classify": ("crop_margin", "lung_conf", "view_fusion"),
}


def warn_other_views(trained, cfg, what: str) -> list[str]:
    """Predicting with views other than the model trained with (crop=, crop_margin=, lung_conf=: predict does not take
    them from the run): a warning naming each, since a crop-trained model on whole images is an experiment, not an
    error. The differences, [] when none."""
    from siimcovid.utils import LOGGER

    was, now = trained.get("crop") or "none", (cfg or {}).get("crop") or "none"
    if was != now:
        diffs = [f"crop={now} (trained with crop={was})"]
    elif now == "none":
        diffs = []
    else:
        shape = [k for k in ("crop_margin", "lung_conf") if k in trained and trained[k] != cfg[k]]
        diffs = [f"{k}={cfg[k]} (trained with {trained[k]})" for k in shape]
    if diffs:
        LOGGER.warning(f"{what}: predicting with {', '.join(diffs)}: give the training's values to predict what it saw")
    return diffs


def view_record(cfg, stage: str) -> dict:
    """crop=lung: the settings that made a run's views, as its predict.yaml records them beside tta and weights (what
    `export` packs); crop=none: nothing (the file as before views existed)."""
    if (cfg.get("crop") or "none") == "none":
        return {}
    return {"crop": cfg.crop, "lung": str(Path(cfg.lung).resolve()), **{k: cfg[k] for k in VIEW_KEYS[stage]}}


# ----------------------------------------------------------------------------- geometry (pure)
def as_rows(boxes) -> np.ndarray:
    """Boxes as a float64 (n, k) copy: one box (k,) is one row; nothing is (0, 4)."""
    boxes = np.array(boxes, dtype=np.float64)
    if boxes.ndim >= 2:
        return boxes.reshape(-1, boxes.shape[-1])
    return boxes.reshape(1, -1) if boxes.size else np.zeros((0, 4))


def widen(box, rows: int, cols: int, margin: float) -> Window:
    """A lung box (original pixels) widened by `margin` of its width / height on each side, clipped to the image."""
    x0, y0, x1, y1 = map(float, box)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(cols), x1 + dx), min(float(rows), y1 + dy)


def pixel_window(window: Window, rows: int, cols: int, size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The whole pixels of an h x w image of the original (the prepared square: h = w = s) that cover `window`:
    rounded outwards, at least one pixel, inside the image."""
    h, w = size_hw
    sx, sy = w / cols, h / rows
    px0, py0 = int(math.floor(window[0] * sx + 1e-9)), int(math.floor(window[1] * sy + 1e-9))
    px1, py1 = int(math.ceil(window[2] * sx - 1e-9)), int(math.ceil(window[3] * sy - 1e-9))
    px0, py0 = min(max(px0, 0), w - 1), min(max(py0, 0), h - 1)
    return px0, py0, min(max(px1, px0 + 1), w), min(max(py1, py0 + 1), h)


def window_of_crop(pixels: tuple[int, int, int, int], rows: int, cols: int, size_hw: tuple[int, int]) -> Window:
    """The original-pixel window that the cut pixels (px0, py0, px1, py1) of an h x w image of the original show."""
    h, w = size_hw
    return pixels[0] * cols / w, pixels[1] * rows / h, pixels[2] * cols / w, pixels[3] * rows / h


def cut(image: np.ndarray, window: Window, rows: int, cols: int) -> tuple[np.ndarray, Window]:
    """(the crop of an image of the original that shows `window`, the exact original window the crop shows)."""
    pixels = pixel_window(window, rows, cols, image.shape[:2])
    px0, py0, px1, py1 = pixels
    return image[py0:py1, px0:px1], window_of_crop(pixels, rows, cols, image.shape[:2])


def to_original(boxes: np.ndarray, shape_hw: tuple[int, int], window: Window) -> np.ndarray:
    """Boxes (n, 4 or 5: x0 y0 x1 y1 [conf]) in the pixels of an h x w array showing `window` -> original pixels."""
    boxes = as_rows(boxes)
    h, w = shape_hw
    sx, sy = (window[2] - window[0]) / w, (window[3] - window[1]) / h
    boxes[:, [0, 2]] = window[0] + boxes[:, [0, 2]] * sx
    boxes[:, [1, 3]] = window[1] + boxes[:, [1, 3]] * sy
    return boxes


def from_original(boxes: np.ndarray, shape_hw: tuple[int, int], window: Window) -> np.ndarray:
    """The inverse of to_original: original-pixel boxes -> the pixels of an h x w array showing `window`, clipped to
    it (training labels of a crop: a box partly outside keeps its inside part)."""
    boxes = as_rows(boxes)
    h, w = shape_hw
    sx, sy = w / (window[2] - window[0]), h / (window[3] - window[1])
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - window[0]) * sx).clip(0, w)
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - window[1]) * sy).clip(0, h)
    return boxes


def hflip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
    """Boxes found on a horizontally flipped image of this width -> the unflipped image's boxes."""
    boxes = as_rows(boxes)
    boxes[:, [0, 2]] = width - boxes[:, [2, 0]]
    return boxes


def fuse_view_boxes(views: list[np.ndarray], rows: int, cols: int, method: str, iou: float) -> np.ndarray:
    """One image's boxes from its views' boxes ((n, 5) each, original pixels): wbf (Weighted Boxes Fusion, every view
    one member, as folds are fused: a box only one of two views found keeps half its confidence) or concat (every
    view's boxes, for a later fusion to merge). One view (an image without a lung window, whose crop view is the whole
    image: WBF of a view with itself) is that view's boxes as they are."""
    views = [np.asarray(v, dtype=np.float64).reshape(-1, 5) for v in views]
    if method == "concat" or len(views) == 1:
        return np.concatenate(views) if views else np.zeros((0, 5))
    if method != "wbf":
        raise SiimError(f"view_fusion={method}: wbf or concat")
    from siimcovid.fuse.wbf import denormalise_boxes, normalise_boxes, wbf_image

    sets = [normalise_boxes(v[:, :4], rows, cols) for v in views]
    boxes, scores = wbf_image(sets, [v[:, 4] for v in views], iou_thr=iou, skip_box_thr=0.0)
    return np.hstack([denormalise_boxes(boxes, rows, cols), scores.reshape(-1, 1)])


# ----------------------------------------------------------------------------- the lung windows of a fold
@dataclass
class LungBoxes:
    """A lung detector's boxes (DETECTIONS tables: its OOF and test predictions), the windows of the crop views.

    tables: {split: table}; the `fold` column says which fold's lung model found the box. source: where they came from
    (messages). folds_id: the fold fingerprint of the lung run (must be the model's: the same folds, no leak).
    oof_sha256: of the lung run's pred_oof.csv, what training crops come from (a run records it: a resume must not
    crop its later folds with boxes predicted again since; export refuses a member whose record differs: check_oof).
    unboxed_whole: a fold or an image with no lung box at all is seen whole (None), not refused. Only a bundle's own
    lung member on new images sets it (siimcovid.predict.members.lung_boxes): there every lung fold predicted every
    image, so a missing box means that fold found no lung (a blank or non-chest image). A lung run's boxes keep it off:
    a missing fold or image there is a lung run not trained or predicted on these images, never a silent whole image.
    """

    tables: dict[str, pd.DataFrame]
    source: str
    folds_id: str | None = None
    oof_sha256: str | None = None
    unboxed_whole: bool = False

    @classmethod
    def of_run(cls, run_dir: str | Path) -> "LungBoxes":
        """A lung run's predictions (`siimcovid detect predict run=<lung run>` writes them), checked to be a lung run's."""
        from siimcovid.rundir import read_run

        run_dir = Path(run_dir)
        settings = run_dir / "detect.yaml"
        if not settings.is_file():
            raise SiimError(f"lung={run_dir}: not a detect run (no detect.yaml): give a `detect train task=lung` run")
        record = read_run(settings)
        if (record.get("task") or "opacity") != "lung":
            task = record.get("task") or "opacity"
            raise SiimError(f"lung={run_dir} is a detect run of task={task}, not a lung detector (task=lung)")
        tables = {}
        for split in ("oof", "test"):
            path = run_dir / f"pred_{split}.csv"
            if path.is_file():
                tables[split] = DETECTIONS.read(path)
        if not tables:
            raise SiimError(f"lung={run_dir} has no predictions: run `siimcovid detect predict run={run_dir}` first")
        oof = run_dir / "pred_oof.csv"
        return cls(tables, str(run_dir), record.get("folds_id"), file_sha256(oof) if oof.is_file() else None)

    def own_fold_windows(self, meta: pd.DataFrame, train: pd.DataFrame, conf: float, margin: float) -> dict:
        """{image_id: window or None} of training rows (image_id, fold), each from the out-of-fold boxes of the image's
        OWN fold j: found by lung model j, which never saw it (a lung model that trained on it would be too good)."""
        found = {}
        for fold, part in train.groupby("fold", sort=True):
            found.update(self.windows(meta, int(fold), list(part.image_id), "oof", conf, margin))
        return found

    def check_folds(self, folds_id: str | None, what: str) -> None:
        """The lung run was trained on the same folds as the model it crops for (else a crop view leaks)."""
        if self.folds_id and folds_id and self.folds_id != folds_id:
            raise SiimError(
                f"lung={self.source} was trained on other folds (fingerprint {self.folds_id}) than {what} ({folds_id}): "
                "its fold k model has seen images of fold k's validation; train both on the same prepared folder"
            )

    def check_oof(self, recorded: str | None, record: str | Path) -> None:
        """A model trained with crops of this lung run (its record's lung_oof_sha256, of the lung run's pred_oof.csv
        then) is refused when pred_oof.csv is another file now: the lung run was predicted again since, and the model's
        training and out-of-fold crops came from other boxes than these."""
        if recorded and recorded != self.oof_sha256:
            now = f"sha256 {self.oof_sha256[:12]}" if self.oof_sha256 else "gone"
            raise SiimError(
                f"{record} records its crops from lung boxes of sha256 {recorded[:12]}, but {Path(self.source) / 'pred_oof.csv'} "
                f"is now {now}: the lung run was predicted again after this model trained (its crops came from other "
                "boxes); train the model again with this lung run, or give the lung run that made its crops"
            )

    def check_boxed(self, seen: pd.DataFrame, fold: int, image_ids: list[str], split: str) -> None:
        """The lung run's boxes `seen` of these images have some of fold k: never the whole image silently, out of fold
        or on test (a lung run not predicted on them, or a fold of it not trained)."""
        if image_ids and seen.empty:
            raise SiimError(
                f"lung={self.source} has no {split} boxes of these {len(image_ids)} images (e.g. {image_ids[0]}): predict "
                "them with the lung run first (`siimcovid detect predict run=<lung run>`; new images: `siimcovid predict` of "
                "a bundle)"
            )
        if image_ids and seen[seen.fold == fold].empty:
            which = "out-of-fold" if split == "oof" else split
            raise SiimError(
                f"lung={self.source} has no {which} boxes of fold {fold} on these {len(image_ids)} images (its fold {fold} "
                "model was not trained and predicted, or found no lung at all): train and predict that fold of it"
            )

    def windows(self, meta: pd.DataFrame, fold: int, image_ids: list[str], split: str, conf: float, margin: float) -> dict:
        """{image_id: window (original pixels) or None (no lung box at or above conf: the whole image)} of fold k's
        model. split: oof (or "train", the prepared split of out-of-fold images) or test. A fold or image with no box at
        all is refused, unless unboxed_whole (a bundle's lung member on new images: None, the whole image)."""
        split = "oof" if split == "train" else split
        table = self.tables.get(split)
        if table is None:
            how = f"`siimcovid detect predict run={self.source} split={split}`"
            raise SiimError(f"lung={self.source} has no {split} predictions: {how}")
        seen = table[table.image_id.isin(set(image_ids))]
        if not self.unboxed_whole:
            self.check_boxed(seen, fold, image_ids, split)
        rows = seen[(seen.fold == fold) & (seen.conf >= conf)]
        best = rows.sort_values("conf", ascending=False, kind="stable").drop_duplicates("image_id").set_index("image_id")
        sizes = meta.set_index("image_id")
        out = {}
        for image_id in image_ids:
            if image_id in best.index:
                r, c = int(sizes.at[image_id, "rows"]), int(sizes.at[image_id, "cols"])
                out[image_id] = widen(best.loc[image_id, BOX_COLUMNS].to_numpy(), r, c, margin)
            else:
                out[image_id] = None
        return out


def lungs_of(cfg) -> LungBoxes | None:
    """The lung boxes of a stage's settings (crop: none | lung, checked as a setting): crop=lung needs lung=<a lung
    run>; crop=none, none."""
    if (cfg.get("crop") or "none") == "none":
        return None
    if not cfg.get("lung"):
        raise SiimError("crop=lung needs lung=<a lung detector run> (`siimcovid detect train task=lung`, then `detect predict`)")
    if cfg.get("source"):  # a lung run's boxes are of its own prepared folder's images only
        raise SiimError(
            f"crop=lung with source={cfg.source}: lung={cfg.lung} has boxes of its own prepared folder's images only; to "
            "crop new images, `siimcovid export` the runs and `siimcovid predict` them (a bundle crops with its lung detector)"
        )
    return LungBoxes.of_run(cfg.lung)


def views_of(image: np.ndarray, window: Window | None, rows: int, cols: int, flips: bool = False) -> list[tuple]:
    """The views of one image of the original: [(array, the original window it shows, flipped)]: the whole image,
    then its crop (where there is a window), each also flipped when `flips`."""
    whole: Window = (0.0, 0.0, float(cols), float(rows))
    out = [(image, whole, False)]
    if window is not None:
        crop, shown = cut(image, window, rows, cols)
        out.append((crop, shown, False))
    if flips:
        out += [(np.ascontiguousarray(a[:, ::-1]), w, True) for a, w, _ in list(out)]
    return out


def view_boxes(boxes: np.ndarray, array: np.ndarray, window: Window, flipped: bool) -> np.ndarray:
    """Boxes a model found on one view (that array's pixels) -> original pixels."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    if flipped:
        boxes = hflip_boxes(boxes, array.shape[1])
    return to_original(boxes, array.shape[:2], window)


def read_gray(path: Path) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SiimError(f"{path} cannot be read as an image: re-run `siimcovid prepare`")
    return image


def detect_views(
    detect_arrays, prepared, size: int, fold: int, image_ids: list[str], split: str, lungs: LungBoxes, cfg, desc: str
) -> pd.DataFrame:
    """A detector's boxes of its views of each image (whole and lung crop), fused per image (cfg.view_fusion), in
    original pixels: columns image_id + BOX_COLUMNS + conf. detect_arrays(arrays) -> [(n, 5) in each array's pixels]
    is the family's (its TTA flips inside)."""
    from tqdm import tqdm

    meta = prepared.meta.set_index("image_id")
    windows = lungs.windows(prepared.meta, fold, image_ids, split, cfg.lung_conf, cfg.crop_margin)
    batch = max(int(cfg.get("batch") or 1), 1)
    frames = []
    with tqdm(total=len(image_ids), desc=desc, unit="img") as bar:
        for start in range(0, len(image_ids), batch):
            chunk = image_ids[start : start + batch]
            sizes = [(int(meta.at[i, "rows"]), int(meta.at[i, "cols"])) for i in chunk]
            views = [
                views_of(read_gray(prepared.image_path(i, split, size)), windows[i], rows, cols)
                for i, (rows, cols) in zip(chunk, sizes)
            ]
            found = iter(detect_arrays([a for v in views for a, _, _ in v]))
            for image_id, (rows, cols), image_views in zip(chunk, sizes, views):
                boxes = [view_boxes(next(found), a, w, f) for a, w, f in image_views]
                fused = fuse_view_boxes(boxes, rows, cols, cfg.view_fusion, cfg.view_iou)
                fused[:, [0, 2]], fused[:, [1, 3]] = fused[:, [0, 2]].clip(0, cols), fused[:, [1, 3]].clip(0, rows)
                frame = pd.DataFrame(fused, columns=[*BOX_COLUMNS, "conf"])
                frame.insert(0, "image_id", image_id)
                frames.append(frame)
            bar.update(len(chunk))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", *BOX_COLUMNS, "conf"])

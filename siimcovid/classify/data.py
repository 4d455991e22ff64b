"""Images, masks and targets for the classifier, read from a prepared folder.

The loader does as little as possible per image: read the 8-bit grey PNG/JPG and its 0/255
box mask (decoded once from DICOM by prepare), augment both with albumentations, and hand
over uint8 tensors. Scaling, normalisation and the repeat to 3 channels happen on the device
inside the model, so a batch crosses to the GPU as uint8 (4x less than float).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from siimcovid.data.prepared import Prepared
from siimcovid.tables import STUDY_CLASSES
from siimcovid.utils import SiimError
from siimcovid.views import cut


def image_table(prep: Prepared, split: str, fold: int | None = None, part: str = "val") -> pd.DataFrame:
    """Rows to feed: image_id, study_id, fold, label (class index, -1 for test), none (1.0 if no box)."""
    df = prep.fold(fold, part) if fold is not None else prep.split(split)
    out = df[["image_id", "study_id", "fold"]].copy()
    out["split"] = df["split"].values
    if split == "train":
        out["label"] = [STUDY_CLASSES.index(c) for c in df["study_label"]]
        out["none"] = (df["n_boxes"].astype(int) == 0).astype(np.float32).values
        out["study_label"] = df["study_label"].values
    else:
        out["label"], out["none"], out["study_label"] = -1, np.nan, ""
    return out.reset_index(drop=True)


def check_files(prep: Prepared, table: pd.DataFrame, size: int, masks: bool) -> None:
    """Fail early and clearly on a missing image or mask (not in a worker halfway through an epoch)."""
    for row in table.itertuples():
        path = prep.image_path(row.image_id, row.split, size)
        if not path.is_file():
            raise SiimError(f"image {row.image_id} has no file {path}: re-run `siimcovid prepare` (sizes include {size})")
        if masks:
            mpath = prep.mask_path(row.image_id, size)
            if not mpath.is_file():
                raise SiimError(f"image {row.image_id} has no mask {mpath}: re-run `siimcovid prepare` to write the masks")


def build_augment(cfg, seed: int | None = None):
    """albumentations pipeline; geometric transforms move the mask with the image.

    albumentations draws from its own generator, which global seeds do not touch: `seed`
    makes the run repeatable (DataLoader workers re-seed it, see seed_worker).
    """
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.Affine(
                scale=(1 - cfg.affine_scale, 1 + cfg.affine_scale),
                translate_percent=(-cfg.affine_shift, cfg.affine_shift),
                rotate=(-cfg.affine_rotate, cfg.affine_rotate),
                border_mode=cv2.BORDER_CONSTANT,
                p=cfg.affine,
            ),
            A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=cfg.brightness_contrast),
        ],
        seed=seed,
    )


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: give each worker its own augmentation stream.

    Workers are forked copies of one albumentations generator: without this every worker
    draws the same flips and affines in the same order. The worker seed is the loader's
    base seed + worker id, so a seeded loader stays repeatable.
    """
    info = torch.utils.data.get_worker_info()
    dataset = getattr(info.dataset, "dataset", info.dataset)  # through a Subset
    # a ConcatDataset (extra training data of an on_train_data hook): each part its own stream
    for i, part in enumerate(getattr(dataset, "datasets", [dataset])):
        augment = getattr(part, "augment", None)
        if augment is not None:
            augment.set_random_seed((info.seed + i) % 2**32)


def _augment_nodes(dataset) -> list:
    """Every albumentations pipeline and transform of a dataset (through a Subset or a ConcatDataset), in a fixed order."""
    dataset = getattr(dataset, "dataset", dataset)
    nodes, todo = [], [getattr(part, "augment", None) for part in getattr(dataset, "datasets", [dataset])]
    while todo:
        node = todo.pop(0)
        if node is not None and hasattr(node, "random_generator"):
            nodes.append(node)
            todo = list(getattr(node, "transforms", [])) + todo
    return nodes


def augment_state(dataset) -> list:
    """The random state of the dataset's augmentation in this process (albumentations keeps one generator
    pair per transform, which no global seed reaches): what a resumed run needs to draw what an
    uninterrupted one would. DataLoader workers hold their own copies (seed_worker), not this one."""
    return [(node.random_generator.bit_generator.state, node.py_random.getstate()) for node in _augment_nodes(dataset)]


def set_augment_state(dataset, state: list) -> bool:
    """Put back what augment_state returned; False (nothing changed) when the augmentation has another shape."""
    nodes = _augment_nodes(dataset)
    if len(nodes) != len(state):
        return False
    for node, (np_state, py_state) in zip(nodes, state):
        node.random_generator.bit_generator.state = np_state
        node.py_random.setstate(py_state)
    return True


def read_grey(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise SiimError(f"could not read image {path}")
    return img


def read_square(path, size: int) -> np.ndarray:
    """The grey image at `path`, which must be size x size (a prepared image of that size)."""
    img = read_grey(path)
    if img.shape != (size, size):
        raise SiimError(f"{path} is {img.shape[1]}x{img.shape[0]}, expected {size}x{size}")
    return img


def crop_view(image: np.ndarray, mask: np.ndarray, window, rows: int, cols: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The lung-crop view of a prepared size x size image and its mask (the same geometry): the prepared pixels that
    show `window` (original pixels; siimcovid.views.cut), resized to the model's input size x size. The mask stays
    0/255 (nearest neighbour)."""
    crop, _ = cut(image, window, rows, cols)
    crop_mask, _ = cut(mask, window, rows, cols)
    return (
        cv2.resize(crop, (size, size), interpolation=cv2.INTER_LINEAR),
        cv2.resize(crop_mask, (size, size), interpolation=cv2.INTER_NEAREST),
    )


class StudyDataset(Dataset):
    """Items: image (1,H,W) uint8, mask (1,H,W) uint8 0/255, label (int64), none (float32), index.

    windows (crop=lung): one per row, the original-pixel window of its lung-crop view (crop_view), or None: the row
    is the whole image."""

    def __init__(self, prep: Prepared, table: pd.DataFrame, size: int, augment=None, masks: bool = True, windows=None):
        self.table, self.size, self.augment, self.masks = table, size, augment, masks
        self.images = [prep.image_path(i, s, size) for i, s in zip(table.image_id, table.split)]
        self.mask_paths = [prep.mask_path(i, size) for i in table.image_id] if masks else None
        self.labels = table["label"].to_numpy(dtype=np.int64)
        self.none = np.nan_to_num(table["none"].to_numpy(dtype=np.float32), nan=0.0)  # test rows: no target
        self.windows = None
        if windows is not None:
            if len(windows) != len(table):
                raise SiimError(f"StudyDataset: {len(windows)} windows for {len(table)} rows")
            shapes = prep.meta.set_index("image_id").loc[list(table.image_id), ["rows", "cols"]].to_numpy(dtype=int)
            self.windows = [None if w is None else (w, int(r), int(c)) for w, (r, c) in zip(windows, shapes)]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        img = read_square(self.images[i], self.size)
        mask = read_grey(self.mask_paths[i]) if self.masks else np.zeros_like(img)
        if self.windows is not None and self.windows[i] is not None:
            img, mask = crop_view(img, mask, *self.windows[i], self.size)
        if self.augment is not None:
            res = self.augment(image=img, mask=mask)
            img, mask = res["image"], res["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img))[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "label": torch.tensor(self.labels[i], dtype=torch.long),
            "none": torch.tensor(self.none[i], dtype=torch.float32),
            "index": torch.tensor(i, dtype=torch.long),
        }


class TargetDataset(Dataset):
    """Items from explicit files and float targets (extra training data, multi-label pretraining): image, mask
    (zeros where unknown), label (C,) float32 (NaN = unknown), none float32 (NaN = unknown), has_mask (bool), index."""

    def __init__(self, images: list, masks: list, targets: np.ndarray, none: np.ndarray, size: int, augment=None):
        self.images, self.mask_paths, self.size, self.augment = list(images), list(masks), size, augment
        self.targets = np.asarray(targets, dtype=np.float32)
        self.none = np.asarray(none, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        img = read_square(self.images[i], self.size)
        has_mask = self.mask_paths[i] is not None
        mask = read_grey(self.mask_paths[i]) if has_mask else np.zeros_like(img)
        if self.augment is not None:
            res = self.augment(image=img, mask=mask)
            img, mask = res["image"], res["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img))[None],
            "mask": torch.from_numpy(np.ascontiguousarray(mask))[None],
            "label": torch.from_numpy(self.targets[i].copy()),
            "none": torch.tensor(self.none[i], dtype=torch.float32),
            "has_mask": torch.tensor(has_mask),
            "index": torch.tensor(i, dtype=torch.long),
        }


class SoftTargets(Dataset):
    """A StudyDataset whose items look like TargetDataset's (a (n_classes,) float study target, has_mask True): the
    two can then share a ConcatDataset and a batch. targets: (study (n, n_classes), none (n,)) of its own (e.g.
    distillation's soft targets); None: the one-hot study label and the image's own none."""

    def __init__(self, dataset: StudyDataset, n_classes: int, targets: tuple | None = None):
        if targets is not None and len(targets[0]) != len(dataset):
            raise SiimError(f"{len(targets[0])} targets for {len(dataset)} training images")
        self.dataset, self.n_classes, self.targets = dataset, n_classes, targets

    @property
    def augment(self):  # seed_worker and the resume's augment_state reach the wrapped dataset's pipeline
        return self.dataset.augment

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        if self.targets is None:
            item["label"] = torch.nn.functional.one_hot(item["label"], self.n_classes).float()
        else:
            item["label"] = torch.from_numpy(self.targets[0][i].copy())
            item["none"] = torch.tensor(self.targets[1][i], dtype=torch.float32)
        item["has_mask"] = torch.tensor(self.dataset.masks)
        return item


def check_paths(paths, what: str) -> None:
    """Fail early on a missing file of extra or external data (not in a worker halfway through an epoch)."""
    for p in paths:
        if p is not None and not Path(p).is_file():
            raise SiimError(f"{what}: file not found {p}")


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch; images become float in [0,1] on the device (cheap there, not in the loader)."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["image"] = out["image"].float().div_(255.0)
    return out


def cutmix_box(shape, lam: float, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], float]:
    """The cutmix rectangle of timm's `cutmix_bbox_and_lam` (sides sqrt(1 - lam) of the image's, centre
    uniform, clipped; lam corrected to the pasted area), its centre drawn from `rng`: timm draws it
    from numpy's global generator, which no seed of the run reaches, so cutmix runs did not repeat."""
    h, w = shape[-2:]
    cut_h, cut_w = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    yl, yh = (int(np.clip(v, 0, h)) for v in (cy - cut_h // 2, cy + cut_h // 2))
    xl, xh = (int(np.clip(v, 0, w)) for v in (cx - cut_w // 2, cx + cut_w // 2))
    return (yl, yh, xl, xh), 1.0 - (yh - yl) * (xh - xl) / float(h * w)


def mix_batch(batch: dict, n_classes: int, mixup_alpha: float, cutmix_alpha: float, rng: np.random.Generator) -> dict:
    """Mask-aware mixup / cutmix: each image is mixed with the batch's reverse (timm's pairing).

    timm's Mixup mixes images and class targets only; here the box masks mix the same way
    (mixup: blended with lam; cutmix: the pasted rectangle brings its mask along), so the mask
    head's target stays true to the mixed image. Study targets become soft (N,4); the none
    target is blended with the final lam. The rectangle is timm's (cutmix_box).
    """
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    images, masks = batch["image"], batch["mask"].float()
    flipped_img, flipped_mask = images.flip(0), masks.flip(0)
    if use_cutmix:
        lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
        (yl, yh, xl, xh), lam = cutmix_box(images.shape, lam, rng)
        images, masks = images.clone(), masks.clone()
        images[:, :, yl:yh, xl:xh] = flipped_img[:, :, yl:yh, xl:xh]
        masks[:, :, yl:yh, xl:xh] = flipped_mask[:, :, yl:yh, xl:xh]
    else:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        images = images * lam + flipped_img * (1 - lam)
        masks = masks * lam + flipped_mask * (1 - lam)
    label = batch["label"]  # class indices, or soft targets of extra data (NaN stays NaN: still masked out)
    onehot = label.float() if label.is_floating_point() else torch.nn.functional.one_hot(label, n_classes).float()
    out = dict(batch)
    if "has_mask" in batch:  # a mixed mask is known where both images' masks are
        out["has_mask"] = batch["has_mask"] & batch["has_mask"].flip(0)
    out.update(
        image=images,
        mask=masks,
        label=onehot * lam + onehot.flip(0) * (1 - lam),
        none=batch["none"] * lam + batch["none"].flip(0) * (1 - lam),
        lam=lam,
    )
    return out

"""One fold of the torchvision detector family (siimcovid.detect.torchvision_family): its data, its training loop,
its checkpoints and its resume.

The data are the prepared folder's, as YOLO reads them: <prepared>/<size>/images/train/<id>.png and the YOLO labels
<size>/labels/train/<id>.txt (class x_center y_center width height, normalised); an image without a label file or
with an empty one is a negative (torchvision takes an empty target). Each image is resized to imgsz x imgsz (the
prepared image is the original squashed to a square: so is what the model reads) and flipped left-right with
probability fliplr; the flips of epoch e are drawn from (seed, e, image) and its batches from a generator seeded
by (seed, e): a resumed fold draws what the killed one would have. crop=lung with crop_train=true: each training
image with a confident lung box is also one more training item, cropped to its window (siimcovid.views: the lung
run's out-of-fold box of the image's own fold, whose lung model never saw it) and resized to imgsz, its boxes mapped
into the crop (the part inside it kept).

A fold folder (FILES of the family):

    last.pt       what resumes: model, optimizer, scaler, the random state (the samplers of the RPN and the ROI
                  heads draw from torch's generator), epoch, best ({score, epoch}), the log's rows; written first
                  each epoch, atomically (our own file: torch.load(weights_only=True)); once every epoch trained,
                  without its optimizer (twice the model's size, nothing left to resume)
    best.pt       the best epoch's model (by the val AP@0.5, or the last is_better event), arch and imgsz
    results.csv   one row per epoch (rewritten from last.pt's rows: a kill between the two leaves nothing wrong)
    done.json     the done record (best_score, best_epoch, epochs), written last

The lr follows Ultralytics' linear schedule (lr0 to lr0 * lrf over the epochs) after a linear warmup of
warmup_epochs: a function of the step, so a resumed fold needs no scheduler state. So on the CPU a fold killed after
any epoch and resumed ends with the weights of one never killed (tests/test_torchvision_resume.py); on a GPU up to
its kernels' nondeterminism.

SWA (swa_epochs, swa_lr; siimcovid.engine.swa): the last swa_epochs epochs average the model's weights (at swa_lr's
constant lr, else the schedule's), the average in last.pt ("swa") so that a resume averages the same; after the last
epoch its batch-norm statistics are recomputed (update_bn: one pass over the training loader, model(images, targets)
in train mode, no gradients, torch's random state forked and seeded: the same whether resumed or not), it is
validated, and it is the fold's weights: best.pt (its AP@0.5 the best_score, its epoch the last) and last.pt's model;
the done record says swa: true and n_averaged. With a pretrained backbone (FrozenBatchNorm2d) there is no
batch-norm statistic to recompute.

AMP (amp=true, Ultralytics' default): on a CUDA device only, the forward pass under torch.autocast(float16) and the
loss scaled by a GradScaler (unscaled before the gradient clipping; its state in last.pt); on the CPU both are off
(autocast disabled, the scaler a pass-through), whatever amp says.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from siimcovid.data.boxes import from_yolo
from siimcovid.engine.swa import SWA, SWA_KEY
from siimcovid.tables import write_csv
from siimcovid.utils import LOGGER, SiimError, atomic_path


def read_labels(path: Path, side: int) -> np.ndarray:
    """A YOLO label file -> (n, 4) x1y1x2y2 boxes in the pixels of the side x side image (missing file: no box)."""
    if not path.is_file():
        return np.zeros((0, 4))
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [float(v) for v in parts[1:5]] if len(parts) == 5 else None
        except ValueError:
            values = None
        if values is None or not all(map(math.isfinite, values)):
            raise SiimError(f"{path} line {line_no}: not a YOLO label (class x_center y_center width height): {line!r}")
        rows.append(values)
    return from_yolo(np.asarray(rows).reshape(-1, 4), side, side)


def to_tensor(image: np.ndarray, imgsz: int) -> torch.Tensor:
    """A uint8 gray (HxW) or 3-channel image -> the model's input: 3 x imgsz x imgsz floats in [0, 1]."""
    import cv2

    if image.shape[:2] != (imgsz, imgsz):
        image = cv2.resize(image, (imgsz, imgsz), interpolation=cv2.INTER_AREA)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)


class FoldImages(torch.utils.data.Dataset):
    """The training images of a fold: (image tensor, target {boxes, labels}) at imgsz, flipped with prob fliplr; then
    the lung crops {image_id: window (original pixels)} of crop_train, one item each (module docstring)."""

    def __init__(self, prep, image_ids: list[str], size: int, imgsz: int, fliplr: float, seed: int, crops=None):
        self.prep, self.ids, self.size, self.imgsz, self.fliplr, self.seed = prep, list(image_ids), size, imgsz, fliplr, seed
        self.crops = list((crops or {}).items())
        self.sizes = prep.meta.set_index("image_id")[["rows", "cols"]] if self.crops else None
        self.epoch = 0  # set before each epoch (workers are not persistent: each epoch's loader copies it)

    def __len__(self) -> int:
        return len(self.ids) + len(self.crops)

    def __getitem__(self, i: int):
        from siimcovid.views import read_gray

        image_id, window = self.crops[i - len(self.ids)] if i >= len(self.ids) else (self.ids[i], None)
        image = read_gray(self.prep.image_path(image_id, "train", self.size))
        boxes = read_labels(self.prep.label_path(image_id, self.size), self.size)  # the prepared image's pixels
        if window is not None:
            image, boxes = self.crop(image_id, image, boxes, window)
        boxes = boxes * (self.imgsz / np.array([image.shape[1], image.shape[0]] * 2, dtype=np.float64))
        tensor = to_tensor(image, self.imgsz)
        if np.random.default_rng([self.seed, self.epoch, i]).random() < self.fliplr:
            tensor = tensor.flip(-1)
            boxes = np.stack([self.imgsz - boxes[:, 2], boxes[:, 1], self.imgsz - boxes[:, 0], boxes[:, 3]], axis=1)
        boxes = boxes.clip(0, self.imgsz)
        boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]  # torchvision refuses empty boxes
        target = {"boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)}
        target["labels"] = torch.ones(len(boxes), dtype=torch.int64)  # 1: opacity (0 is torchvision's background)
        return tensor, target

    def crop(self, image_id: str, image: np.ndarray, boxes: np.ndarray, window) -> tuple[np.ndarray, np.ndarray]:
        """(the crop of the prepared image showing the window, its boxes in the crop's pixels)."""
        from siimcovid.views import cut, from_original

        rows, cols = (int(v) for v in self.sizes.loc[image_id, ["rows", "cols"]])
        crop, shown = cut(image, window, rows, cols)
        scale = np.array([cols / self.size, rows / self.size] * 2, dtype=np.float64)
        return crop, from_original(boxes * scale, crop.shape[:2], shown)


def collate(batch):
    return tuple(zip(*batch))


def save_torch(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_own(path: Path) -> dict:
    """One of our own checkpoints (tensors and plain values only: weights_only, nothing to execute)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SiimError(f"{path} cannot be read ({type(e).__name__}): delete its fold folder to train it again") from None


def own_fold_windows(prep, lungs, image_ids: list[str], conf: float, margin: float) -> dict:
    """{image_id: window} of the training images with a confident lung box, each from the lung run's out-of-fold boxes
    of the image's OWN fold (views.LungBoxes.own_fold_windows)."""
    table = prep.split("train").set_index("image_id").loc[list(image_ids)].reset_index()
    return {i: w for i, w in lungs.own_fold_windows(prep.meta, table, conf, margin).items() if w is not None}


def rng_state(device) -> dict:
    """torch's random state (CPU, and the CUDA device's): the RPN's and the ROI heads' samplers draw from it."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict | None, device) -> None:
    if not state:  # a checkpoint from before it was saved: the resumed epochs draw other samples
        LOGGER.warning("detect: last.pt has no random state: the resumed epochs sample other anchors than a run never killed")
        return
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def lr_at(step: int, steps_per_epoch: int, hp: dict) -> float:
    """Ultralytics' linear schedule after a linear warmup (module docstring); step counts from 0."""
    epoch = step / max(steps_per_epoch, 1)
    lr = hp["lr0"] * ((1 - epoch / hp["epochs"]) * (1 - hp["lrf"]) + hp["lrf"])
    warm = hp["warmup_epochs"] * steps_per_epoch
    return lr * min(1.0, 0.1 + 0.9 * step / warm) if warm > 0 and step < warm else lr


def new_optimizer(model, hp: dict):
    params = [p for p in model.parameters() if p.requires_grad]
    if hp["optimizer"] == "AdamW":
        return torch.optim.AdamW(params, lr=hp["lr0"], betas=(hp["momentum"], 0.999), weight_decay=hp["weight_decay"])
    return torch.optim.SGD(params, lr=hp["lr0"], momentum=hp["momentum"], weight_decay=hp["weight_decay"], nesterov=True)


class FoldTrainer:
    """One fold's training (module docstring): the family gives the model, the data and how to validate."""

    def __init__(self, family, job, view, model, hp: dict, device):
        self.family, self.job, self.view, self.model, self.hp, self.device = family, job, view, model, hp, device
        self.files, self.dir = family.files, Path(job.folder)
        self.amp = device.type == "cuda" and bool(hp["amp"])  # never on the CPU (module docstring)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.opt = new_optimizer(model, hp)
        self.best, self.rows, self.start = {"score": -math.inf, "epoch": 0}, [], 1
        self.swa = SWA.of(hp, hp["epochs"])  # swa_epochs > 0 (module docstring)

    def loader(self, dataset):
        cfg = self.family.cfg
        gen = torch.Generator().manual_seed(int(self.hp["seed"]) * 1000 + dataset.epoch)  # the epoch's order, resumable
        kw = {"num_workers": cfg.workers, "pin_memory": self.device.type == "cuda", "collate_fn": collate}
        return torch.utils.data.DataLoader(
            dataset, batch_size=self.hp["batch"], shuffle=True, drop_last=len(dataset) > self.hp["batch"], generator=gen, **kw
        )

    def resume(self) -> None:
        """A partial fold: the state of its last finished epoch; best.pt and results.csv made to agree with it."""
        ckpt = load_own(self.dir / self.files.last)
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:  # None: every epoch trained (the end strips it), the done marker not yet
            self.opt.load_state_dict(ckpt["optimizer"])
        if self.amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.best, self.rows, self.start = dict(ckpt["best"]), list(ckpt["rows"]), int(ckpt["epoch"]) + 1
        if self.swa is not None:
            self.swa.load_state_dict(ckpt.get(SWA_KEY), self.model)
        if self.start <= self.hp["epochs"]:
            set_rng_state(ckpt.get("rng"), self.device)
        best_path = self.dir / self.files.best
        if self.best["epoch"] == ckpt["epoch"] and (not best_path.is_file() or load_own(best_path).get("epoch") != ckpt["epoch"]):
            self.save_best(ckpt["epoch"], self.best["score"])  # killed between last.pt and best.pt
        self.write_log()
        LOGGER.info(f"detect: {self.dir} resumes at epoch {self.start} of {self.hp['epochs']}")

    def train_epoch(self, dataset, epoch: int) -> dict:
        self.model.train()
        dataset.epoch = epoch
        loader = self.loader(dataset)
        steps, sums, n, t0 = len(loader), {}, 0, time.perf_counter()
        scheduled = self.swa is None or not self.swa.owns_lr(epoch)  # else SWALR holds swa_lr
        if self.swa is not None:
            self.swa.set_lr(self.opt, epoch)
        for i, (images, targets) in enumerate(loader):
            for group in self.opt.param_groups if scheduled else ():
                group["lr"] = lr_at((epoch - 1) * steps + i, steps, self.hp)
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                parts = self.model(images, targets)
            loss = sum(parts.values())
            if not torch.isfinite(loss):
                raise SiimError(f"{self.dir}: epoch {epoch}: the loss became {float(loss)}; lower lr0 or turn amp off")
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.scaler.step(self.opt)
            self.scaler.update()
            for k, v in {"loss": loss, **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(images)
            n += len(images)
        stats = {f"train_{k}": v / max(n, 1) for k, v in sums.items()}
        return {**stats, "lr": self.opt.param_groups[0]["lr"], "train_img_s": n / max(time.perf_counter() - t0, 1e-9)}

    def is_better(self, stats: dict) -> bool:
        rules = self.job.callbacks.get("is_better") or []
        if rules:
            return bool(rules[-1](self.view, stats, dict(self.best)))
        return stats["val_ap50"] > self.best["score"]  # nan (no opacity in the fold's val images): never better

    def save_best(self, epoch: int, score: float) -> None:
        record = {"model": self.model.state_dict(), "epoch": epoch, "score": score, "fold": self.job.fold}
        save_torch({**record, **self.family.description()}, self.dir / self.files.best)

    def swa_finish(self, dataset, validate) -> dict:
        """The SWA average, batch-norm recomputed, validated and made the fold's weights (self.model, best.pt); the
        done record's SWA keys."""
        epochs, before = self.hp["epochs"], dict(self.best)
        dataset.epoch = epochs + 1  # an order and flips of its own
        batches = ({"images": [im.to(self.device) for im in images], "targets": [{k: v.to(self.device) for k, v in t.items()}
                    for t in targets]} for images, targets in self.loader(dataset))  # fmt: skip
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(self.hp["seed"]) * 1000 + epochs + 1)  # the samplers' draws: the same after a resume
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                average = self.swa.final_model(batches, lambda model, b: model(b["images"], b["targets"]))
        self.model.load_state_dict(average.state_dict())
        self.model.eval()
        score = validate(self.model)
        self.best = {"score": score if not math.isnan(score) else -math.inf, "epoch": epochs}
        self.save_best(epochs, self.best["score"])
        LOGGER.info(f"detect fold {self.job.fold}: SWA of the last {self.swa.epochs} epochs ({self.swa.n_averaged} averaged): "
                    f"val AP50 {score:.4f} (the best epoch before: {before['epoch']}, {before['score']:.4f}); best.pt and "
                    "last.pt hold the SWA weights")  # fmt: skip
        return {"swa": True, "swa_epochs": self.swa.epochs, "n_averaged": self.swa.n_averaged}

    def write_log(self) -> None:
        write_csv(pd.DataFrame(self.rows), self.dir / self.files.log)

    def fit(self, dataset, validate) -> dict:
        """Every epoch from self.start: train, validate, checkpoints (last.pt first), the log, the events."""
        job, view = self.job, self.view
        job.fire("on_train_start", view)
        for epoch in range(self.start, self.hp["epochs"] + 1):
            view.epoch, t0 = epoch, time.perf_counter()
            job.fire("on_train_epoch_start", view)
            stats = self.train_epoch(dataset, epoch)
            if self.swa is not None:
                self.swa.update(self.model, epoch)
            job.fire("on_train_epoch_end", view)
            self.model.eval()
            stats["val_ap50"] = validate(self.model)
            new_best = self.best["epoch"] == 0 or self.is_better(stats)
            if new_best:
                score = stats["val_ap50"]
                self.best = {"score": score if not math.isnan(score) else -math.inf, "epoch": epoch}
            row = {"epoch": epoch, **stats, "best": self.best["epoch"] == epoch, "time_s": time.perf_counter() - t0}
            self.rows.append(row)
            last = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict()}
            last["rng"] = rng_state(self.device)  # after validation (which draws nothing): the next epoch's
            last[SWA_KEY] = self.swa.state_dict() if self.swa is not None else None
            save_torch({**last, "epoch": epoch, "best": self.best, "rows": self.rows, **self.family.description()},
                       self.dir / self.files.last)  # fmt: skip
            if new_best:
                self.save_best(epoch, self.best["score"])
            self.write_log()
            LOGGER.info(f"detect fold {job.fold} epoch {epoch}: loss {stats.get('train_loss', math.nan):.4f} "
                        f"val AP50 {stats['val_ap50']:.4f}{' *best*' if new_best else ''}")  # fmt: skip
            job.fire("on_model_save", view)
            job.fire("on_fit_epoch_end", view, row)
        last = load_own(self.dir / self.files.last)
        swa = self.swa_finish(dataset, validate) if self.swa is not None else {}
        summary = {"fold": job.fold, "best_score": self.best["score"], "best_epoch": self.best["epoch"]}
        summary.update(epochs=self.hp["epochs"], **swa)
        if last.pop("optimizer", None) is not None or swa:  # nothing left to resume: the optimizer's state (2x the model) goes
            last.update({"model": self.model.state_dict()} if swa else {})  # the SWA weights
            save_torch({k: v for k, v in last.items() if k not in ("scaler", "rng")}, self.dir / self.files.last)
        self.files.write_done(self.dir, summary)  # last: the fold is finished
        job.fire("on_train_end", view, summary)
        return summary

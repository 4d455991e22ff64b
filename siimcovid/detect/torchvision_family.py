"""torchvision's detectors as a model family (`siimcovid detect train family=torchvision arch=...`).

    siimcovid detect train family=torchvision data=runs/prepare/siim arch=fasterrcnn_resnet50_fpn_v2 imgsz=512 epochs=20
    siimcovid detect predict run=runs/detect/siim-fasterrcnn_resnet50_fpn_v2 split=oof,test tta=true

arch: fasterrcnn_resnet50_fpn_v2 (the default), fasterrcnn_mobilenet_v3_large_fpn (light), retinanet_resnet50_fpn_v2,
fcos_resnet50_fpn; each built by torchvision.models.detection.<arch>(..., min_size=imgsz, max_size=imgsz) (else
torchvision resizes every image to 800 px) with two classes, torchvision's background (0) and opacity (1).
pretrained=true: the COCO weights of torchvision's weights enum (`weights="DEFAULT"`: downloaded once into torch's
hub cache, ~/.cache/torch/hub/checkpoints) with the class predictor replaced for background + opacity (Faster R-CNN's
box predictor, RetinaNet's and FCOS' classification head: a new layer, every other tensor COCO's); pretrained=false:
weights=None, weights_backbone=None, every tensor random (tests).

Same data and folds as YOLO: the prepared folder's images and YOLO labels (siimcovid.detect.torchvision_train), its
patient-grouped folds. The Ultralytics settings of the same meaning are read too (given on the command line as for
YOLO; their defaults Ultralytics'): lr0, lrf, momentum, weight_decay, optimizer (SGD, AdamW; auto = SGD),
warmup_epochs, amp (mixed precision with a GradScaler on a GPU; off on the CPU), seed and fliplr (the training flips);
any other Ultralytics setting is refused. Validation each epoch: the AP@0.5 of the fold's val images (whole, one view)
against the competition's truth (as `detect predict` scores its out-of-fold boxes) picks best.pt. task=opacity only:
the lung detector that crop=lung crops with is a YOLO run (`detect train task=lung`).

crop=lung (lung=<a lung run>; siimcovid.views, as family=yolo): with crop_train=true each training image's lung crop is
one more training item (siimcovid.detect.torchvision_train); at predict each image is seen whole and cropped to fold
k's lung box (views.detect_views), each view through detect_arrays (with its tta flip), the views' boxes mapped to
ORIGINAL pixels and fused by view_fusion.

Prediction (detect_arrays): each image resized to imgsz x imgsz, and with tta=true also its left-right flip, the
flip's boxes mirrored back and both views' boxes merged by WBF (iou=, skip below conf=); boxes map back to the
array's pixels (x * width / imgsz), then predict_images maps the prepared s x s image's to ORIGINAL pixels (x * cols /
s, y * rows / s). A bundle carries each fold as safetensors and model.yaml {family: torchvision, arch, num_classes,
imgsz}, every field checked, the tensors' names and shapes checked against the architecture built on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from siimcovid.detect.torchvision_model import ARCHS, DESCRIPTION_KEYS, NUM_CLASSES, build, new_predictor  # noqa: F401
from siimcovid.engine.family import Family, FoldData, FoldFiles, FoldView, Job, register_family
from siimcovid.utils import LOGGER, SiimError
from siimcovid.views import hflip_boxes, read_gray

# The Ultralytics settings this family reads, in the same meaning (their defaults: Ultralytics' DEFAULT_CFG_DICT)
HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "optimizer", "warmup_epochs", "amp", "seed", "fliplr")
OPTIMIZERS = {"SGD": "SGD", "AdamW": "AdamW", "auto": "SGD"}
PREDICT_ONLY = ("quantize",)  # the Ultralytics setting detect predict adds (fp16 on a GPU unless 32)
FILES = FoldFiles(settings="detect.yaml", best="best.pt", last="last.pt", done="done.json")


def set_postprocess(net, conf: float, iou: float, max_det: int, imgsz: int | None = None) -> None:
    """The score threshold, NMS IoU and boxes per image of a built model (no weights depend on them); imgsz: its
    input size (predict_imgsz)."""
    heads = getattr(net, "roi_heads", None) or net  # Faster R-CNN keeps them in its ROI heads, RetinaNet / FCOS on itself
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = float(conf), float(iou), int(max_det)
    if imgsz:
        net.transform.min_size, net.transform.max_size = (int(imgsz),), int(imgsz)


@dataclass
class Detector:
    """What load_fold / from_state return: the model (images -> [{boxes, scores, labels}]), its input size, where it
    runs, fp16 or not."""

    net: Any
    imgsz: int
    device: Any
    half: bool = False
    bf16: bool = False  # the CPU under autocast(bfloat16): precision=bf16 (siimcovid.engine.devices.cpu_precision)


@register_family("torchvision")
class TorchvisionFamily(Family):
    stage, output, files = "detect", "det", FILES
    crops = True  # crop=lung: the crops train (crop_train) and predict_images sees each image whole and cropped
    reads_precision = True  # from_state: Detector.bf16

    @classmethod
    def bundle_kind(cls):
        from siimcovid.detect.torchvision_bundle import bundle_kind

        return bundle_kind(cls)

    # ---------------------------------------------------------------- training
    def hyp(self) -> dict:
        """The training settings: siimcovid's, then HYP_KEYS (given, else Ultralytics' defaults)."""
        from ultralytics.cfg import DEFAULT_CFG_DICT

        cfg = self.cfg
        hp = {k: cfg.get(k) if cfg.get(k) is not None else DEFAULT_CFG_DICT[k] for k in HYP_KEYS}
        return {
            **hp,
            "optimizer": OPTIMIZERS.get(str(hp["optimizer"]), hp["optimizer"]),
            "epochs": cfg.epochs,
            "batch": cfg.batch,
            "swa_epochs": cfg.get("swa_epochs") or 0,
            "swa_lr": cfg.get("swa_lr"),
        }

    def open_data(self) -> FoldData:
        from siimcovid.config import default_name
        from siimcovid.data.prepared import Prepared
        from siimcovid.detect.common import resolve_data, select_folds

        cfg = self.cfg
        if (cfg.get("task") or "opacity") != "opacity":  # before the data: task=lung would look for the lung YAMLs
            raise SiimError(
                f"family=torchvision trains opacity detectors only, not task={cfg.task}: the lung detector is family=yolo "
                "(`siimcovid detect train task=lung`), whose boxes crop=lung gives a torchvision run too"
            )
        if cfg.get("lung"):  # recorded as an absolute path, like data=: a resume from elsewhere reads the same lung run
            cfg.lung = str(Path(cfg.lung).resolve())
        source = resolve_data(cfg.data, cfg.data_yaml_dir, "opacity")
        self.prep, self.size = Prepared(source.prepared), source.size
        folds = select_folds(cfg.fold, source)
        name = default_name("detect", f"{source.name}-{cfg.arch}", "the dataset and the arch")
        learned = {
            "prepared": str(source.prepared),
            "size": source.size,
            "n_folds": source.n_folds,
            "folds_id": self.prep.folds_id,
        }
        return FoldData(self.prep, source.n_folds, folds, self.prep.folds_id, name, [source.prepared], learned)

    def check(self, data: FoldData) -> None:
        from siimcovid.detect.common import passthrough
        from siimcovid.engine.devices import parse

        cfg = self.cfg
        if cfg.arch not in ARCHS:
            raise SiimError(f"family=torchvision: arch={cfg.arch}: one of {', '.join(ARCHS)}")
        from siimcovid.engine.swa import check_swa

        check_swa(cfg, cfg.epochs)  # swa_epochs < epochs (siimcovid.engine.swa)
        other = sorted(set(passthrough(cfg)) - set(HYP_KEYS))
        if other:
            raise SiimError(f"family=torchvision reads the Ultralytics settings {', '.join(HYP_KEYS)} only, not {other}")
        if cfg.extra:
            raise SiimError("family=torchvision: extra= is not supported (a YOLO run takes extra training images)")
        if cfg.get("distill"):
            raise SiimError("family=torchvision: distill= is not supported (a YOLO student, family=yolo, learns from teachers)")
        if not isinstance(cfg.pretrained, bool):
            raise SiimError(
                f"family=torchvision: pretrained={cfg.pretrained}: true (COCO) or false (give a run's checkpoint as init=)"
            )
        if cfg.batch < 1 or (parse(cfg.device).count or 0) > 1:
            raise SiimError(f"family=torchvision trains with batch >= 1 on one device, not batch={cfg.batch} device={cfg.device}")
        hp = self.hyp()
        if hp["optimizer"] not in OPTIMIZERS.values():
            raise SiimError(f"family=torchvision: optimizer={hp['optimizer']}: one of {', '.join(OPTIMIZERS)}")
        if cfg.imgsz > data.learned["size"]:
            LOGGER.warning(f"detect: imgsz={cfg.imgsz} is above the prepared images' {data.learned['size']} px: upsampled")

    def check_init(self, path: Path) -> None:
        from siimcovid.detect.torchvision_train import load_own

        if path.name != self.files.best or not isinstance(load_own(path).get("model"), dict):
            raise SiimError(f"init={self.cfg.init}: {path} is not a torchvision detect run's {self.files.best}")

    def description(self) -> dict:
        """The model a fold trains, as a bundle describes it (DESCRIPTION_KEYS)."""
        return {"arch": self.cfg.arch, "num_classes": NUM_CLASSES, "imgsz": int(self.cfg.imgsz)}

    def train_fold(self, job: Job) -> dict:
        import torch

        from siimcovid.data.truth import image_truth, oof_images
        from siimcovid.detect.torchvision_train import FoldImages, FoldTrainer, load_own, own_fold_windows
        from siimcovid.engine.devices import torch_device

        given = [e for e in ("on_train_data", "on_loss") if job.callbacks.get(e)]
        if given:
            raise SiimError(f"family=torchvision: its training loop has no {', '.join(given)} event")
        cfg, hp, prep = self.cfg, self.hyp(), self.prep
        device = torch_device(job.device)
        torch.manual_seed(int(hp["seed"]) + job.fold)
        net = build(cfg.arch, cfg.imgsz, cfg.pretrained)
        if self.init_path is not None:
            own = net.state_dict()
            state = {k: v for k, v in load_own(self.init_path)["model"].items() if k in own and own[k].shape == v.shape}
            net.load_state_dict(state, strict=False)
            LOGGER.info(f"detect: init from {self.init_path}: {len(state)} of {len(own)} tensors")
        set_postprocess(net, cfg.conf, cfg.iou, cfg.max_det)
        net.to(device)
        trainer = FoldTrainer(self, job, FoldView(self, job), net, hp, device)
        job.folder.mkdir(parents=True, exist_ok=True)
        if job.state == "partial":
            trainer.resume()
        train_ids, val_ids = list(prep.fold(job.fold, "train").image_id), list(prep.fold(job.fold, "val").image_id)
        lungs, crops = self.lung_boxes(prep.folds_id), None
        if lungs is not None and cfg.crop_train:
            crops = own_fold_windows(prep, lungs, train_ids, cfg.lung_conf, cfg.crop_margin)
            LOGGER.info(f"detect fold {job.fold}: {len(train_ids)} training images + {len(crops)} lung crops of them")
        dataset = FoldImages(prep, train_ids, self.size, cfg.imgsz, float(hp["fliplr"]), int(hp["seed"]), crops)
        truth = image_truth(oof_images(prep.root, val_ids))
        run = ValRun(prep, self.size, cfg.name or job.run_dir.name)

        def validate(model) -> float:
            from siimcovid import metrics

            pred = self.boxes_table(Detector(model, cfg.imgsz, device, False), run, job.fold, val_ids, "train", False)
            return float(metrics.average_precision(truth, metrics.image_pred(pred), "opacity"))

        return trainer.fit(dataset, validate)

    def skipped(self, job: Job) -> dict:
        return self.files.read_done(job.folder)

    # ---------------------------------------------------------------- prediction
    def load_fold(self, run, fold: int, path: Path, device) -> Detector:
        from siimcovid.detect.torchvision_train import load_own

        ckpt = load_own(Path(path))
        desc = self.check_description({k: ckpt.get(k) for k in DESCRIPTION_KEYS}, str(path))
        return self.from_state(ckpt["model"], desc, device)

    def from_state(self, state: dict, desc: dict, device) -> Detector:
        from siimcovid.engine.devices import torch_device

        device = torch_device(device) if not hasattr(device, "type") else device
        net = build(desc["arch"], desc["imgsz"])
        net.load_state_dict(state)
        cfg = self.cfg
        set_postprocess(net, cfg.get("conf", 0.001), cfg.get("iou", 0.5), cfg.get("max_det", 100), cfg.get("predict_imgsz"))
        from siimcovid.engine.devices import cpu_precision

        half = device.type == "cuda" and cfg.get("quantize") != 32
        bf16 = cpu_precision(device, cfg.get("precision")) == "bf16"
        return Detector(net.eval().to(device), int(cfg.get("predict_imgsz") or desc["imgsz"]), device, half, bf16)

    def detect_arrays(self, model: Detector, images: list[np.ndarray], tta: bool) -> list[np.ndarray]:
        """Boxes of each image (uint8, HxW gray or HxWx3; the prepared image or a crop of it, any size: resized to the
        model's input inside), each (n, 5) float [x_min, y_min, x_max, y_max, conf] in THAT array's pixels."""
        import torch

        from siimcovid.detect.torchvision_train import to_tensor
        from siimcovid.fuse.wbf import wbf_image

        cfg, side = self.cfg, model.imgsz
        batch, out = max(int(cfg.get("batch") or 1), 1), []
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            inputs = [to_tensor(a, side).to(model.device) for a in chunk]
            views = [inputs, [t.flip(-1) for t in inputs]] if tta else [inputs]
            dtype = torch.bfloat16 if model.bf16 else torch.float16
            with torch.no_grad(), torch.autocast(model.device.type, dtype=dtype, enabled=model.half or model.bf16):
                found = [model.net(v) for v in views]
            for i, array in enumerate(chunk):
                sets = [boxes_of(found[v][i], side) for v in range(len(views))]
                if tta:
                    sets[1][:, :4] = hflip_boxes(sets[1][:, :4], side)
                    fused, conf = wbf_image([s[:, :4] / side for s in sets], [s[:, 4] for s in sets],
                                            iou_thr=cfg.get("iou", 0.5), skip_box_thr=cfg.get("conf", 0.001))  # fmt: skip
                    boxes = np.hstack([fused * side, conf[:, None]])
                else:
                    boxes = sets[0]
                rows, cols = array.shape[:2]
                boxes[:, [0, 2]] *= cols / side
                boxes[:, [1, 3]] *= rows / side
                out.append(boxes)
        return out

    def predict_images(self, model: Detector, run, fold: int, image_ids: list[str], split: str) -> pd.DataFrame:
        """tables.DETECTIONS in ORIGINAL pixels; crop=lung: of each image's views, whole and lung crop (module
        docstring), as family=yolo."""
        tta, lungs = bool(self.cfg.get("tta")), self.lung_boxes(run.prepared.folds_id)
        if lungs is None:
            return self.boxes_table(model, run, fold, image_ids, split, tta)
        from siimcovid.tables import DETECTIONS
        from siimcovid.views import detect_views

        desc = f"predict {run.name} fold {fold} {split} (whole + lung crop)"
        detector = lambda arrays: self.detect_arrays(model, arrays, tta)  # noqa: E731
        found = detect_views(detector, run.prepared, run.size, fold, image_ids, split, lungs, self.cfg, desc)
        found["model"], found["fold"] = run.name, fold
        return found[DETECTIONS.required]

    def boxes_table(self, model: Detector, run, fold: int, image_ids: list[str], split: str, tta: bool):
        """The images' boxes in ORIGINAL pixels, tables.DETECTIONS, of the whole images (one view: a fold's validation
        in training, and predict with crop=none)."""
        from siimcovid.detect.predict import no_detections
        from siimcovid.tables import DETECTIONS

        meta, frames = run.prepared.meta.set_index("image_id"), []
        for start in range(0, len(image_ids), 64):  # a few images in memory at a time
            chunk = image_ids[start : start + 64]
            arrays = [read_gray(run.prepared.image_path(i, split, run.size)) for i in chunk]
            for image_id, boxes in zip(chunk, self.detect_arrays(model, arrays, tta)):
                rows, cols = int(meta.at[image_id, "rows"]), int(meta.at[image_id, "cols"])
                frames.append(to_original(boxes, run.size, rows, cols).assign(image_id=image_id))
        out = pd.concat(frames, ignore_index=True) if frames else no_detections()
        out["model"], out["fold"] = run.name, fold
        return out[DETECTIONS.required]

    def oof_ids(self, run, fold: int) -> list[str]:
        return list(run.prepared.fold(fold, "val").image_id)

    def test_ids(self, run) -> list[str]:
        return list(run.prepared.split("test").image_id)

    def join(self, run, parts: list, split: str) -> pd.DataFrame:
        from siimcovid.detect.predict import no_detections

        return pd.concat(parts, ignore_index=True) if parts else no_detections()

    # ---------------------------------------------------------------- bundle (siimcovid.detect.torchvision_bundle)
    def pack_state(self, path: Path) -> tuple[dict, dict]:
        from siimcovid.detect.torchvision_train import load_own

        ckpt = load_own(Path(path))
        return ckpt["model"], self.check_description({k: ckpt.get(k) for k in DESCRIPTION_KEYS}, f"export: {path}")

    def check_description(self, desc: dict, where: str) -> dict:
        from siimcovid.detect.torchvision_bundle import check_description

        return check_description(desc, where)

    def check_state(self, desc: dict, shapes: dict, where: str) -> None:
        from siimcovid.detect.torchvision_bundle import check_state

        check_state(desc, shapes, where)


@dataclass
class ValRun:
    """What predict_images reads of a run, for a fold's validation in training."""

    prepared: Any
    size: int
    name: str


def boxes_of(result: dict, side: int) -> np.ndarray:
    """A torchvision result {boxes, scores, labels} -> (n, 5) [x1, y1, x2, y2, conf] of its opacity boxes, clipped."""
    keep = result["labels"] == 1
    boxes = result["boxes"][keep].float().cpu().numpy().astype(np.float64).reshape(-1, 4).clip(0, side)
    return np.hstack([boxes, result["scores"][keep].float().cpu().numpy().astype(np.float64).reshape(-1, 1)])


def to_original(boxes: np.ndarray, size: int, rows: int, cols: int) -> pd.DataFrame:
    """(n, 5) boxes in the prepared size x size image -> ORIGINAL pixels (x * cols / size, y * rows / size), clipped."""
    from siimcovid.data.boxes import scale_boxes
    from siimcovid.tables import BOX_COLUMNS

    xyxy = scale_boxes(boxes[:, :4], (size, size), (cols, rows))
    xyxy[:, [0, 2]] = xyxy[:, [0, 2]].clip(0, cols)
    xyxy[:, [1, 3]] = xyxy[:, [1, 3]].clip(0, rows)
    frame = pd.DataFrame(xyxy, columns=BOX_COLUMNS)
    frame["conf"] = boxes[:, 4]
    return frame

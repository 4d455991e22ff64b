"""The torchvision detectors of family=torchvision, built once here (its family and its bundle member both build them)."""

from __future__ import annotations

from siimcovid.utils import LOGGER

ARCHS = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn")
NUM_CLASSES = 2  # torchvision's background (0) and opacity (1), for every arch (RetinaNet and FCOS never see a 0)
DESCRIPTION_KEYS = ("arch", "num_classes", "imgsz")  # model.yaml of a bundle, beside `family`


def build(arch: str, imgsz: int, pretrained: bool = False):
    """The torchvision detector (module docstring): COCO weights with a new class predictor, or random."""
    from torchvision.models import detection

    builder = getattr(detection, arch)
    if not pretrained:
        return builder(weights=None, weights_backbone=None, num_classes=NUM_CLASSES, min_size=imgsz, max_size=imgsz)
    model = builder(weights="DEFAULT", min_size=imgsz, max_size=imgsz)  # torchvision's COCO weights (91 classes)
    LOGGER.info(f"detect: {arch} with torchvision's COCO weights, its class predictor new (background + opacity)")
    return new_predictor(model, arch)


def new_predictor(model, arch: str):
    """A COCO model's class predictor replaced by one of NUM_CLASSES (its other tensors kept)."""
    from functools import partial

    from torch import nn
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.fcos import FCOSClassificationHead
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    if arch.startswith("fasterrcnn"):
        old = model.roi_heads.box_predictor
        model.roi_heads.box_predictor = FastRCNNPredictor(old.cls_score.in_features, NUM_CLASSES)
    elif arch.startswith("retinanet"):  # the v2 head's GroupNorm, as retinanet_resnet50_fpn_v2 builds it
        anchors = model.head.classification_head.num_anchors
        head = RetinaNetClassificationHead(
            model.backbone.out_channels, anchors, NUM_CLASSES, norm_layer=partial(nn.GroupNorm, 32)
        )
        model.head.classification_head = head
    else:
        anchors = model.head.classification_head.num_anchors
        model.head.classification_head = FCOSClassificationHead(model.backbone.out_channels, anchors, NUM_CLASSES)
    return model



"""Bundle size of a real-data ensemble, estimated from checkpoint sizes (issue 11).

Builds the real architectures without weights (their size does not depend on the values) and
saves them the way a bundle stores them: Ultralytics checkpoints in fp16 (as Ultralytics saves
them), classifiers as {model_cfg, model, folds_id} in fp32 and in fp16 (`export half=true`).

    python benchmarks/bundle_sizes.py            # prints MB per fold and the 2 + 2 models x 5 folds total
"""

from __future__ import annotations

import io

import torch


def saved_mb(obj) -> float:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell() / 1e6


def detector_mb(yaml_name: str) -> float:
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(yaml_name, nc=1, verbose=False)
    return saved_mb({"epoch": -1, "model": model.half(), "optimizer": None})


def classifier_mb(name: str) -> tuple[float, float]:
    from siimcovid.classify.model import build_model

    cfg = {"model": name, "in_chans": 3, "drop_rate": 0.3, "drop_path_rate": 0.2, "mask_stride": 16, "none_head": True}
    state = build_model(cfg, pretrained=False).state_dict()
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    full_mb = saved_mb({"model_cfg": cfg, "model": state, "folds_id": ""})
    return full_mb, saved_mb({"model_cfg": cfg, "model": half, "folds_id": ""})


def main(folds: int = 5) -> None:
    det = {y: detector_mb(y) for y in ("yolov5m.yaml", "yolov5x.yaml")}
    cls = {n: classifier_mb(n) for n in ("tf_efficientnet_b3_ns", "tf_efficientnet_b5_ns")}
    for name, mb in det.items():
        print(f"{name:24s} {mb:7.1f} MB per fold (fp16, as Ultralytics saves it)")
    for name, (full, half) in cls.items():
        print(f"{name:24s} {full:7.1f} MB per fold fp32, {half:6.1f} MB fp16")
    det_total = folds * sum(det.values())
    full_total = det_total + folds * sum(f for f, _ in cls.values())
    half_total = det_total + folds * sum(h for _, h in cls.values())
    print(f"2 detectors + 2 classifiers x {folds} folds: {full_total / 1e3:.2f} GB, {half_total / 1e3:.2f} GB with half=true")


if __name__ == "__main__":
    main()

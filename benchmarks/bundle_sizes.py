"""Bundle size of a real-data ensemble, estimated from the size of its weights files (issue 11; format 2: issue 17).

Builds the real architectures without weights (their size does not depend on the values) and stores them the
way a bundle stores them (siimcovid.weights.save_state: safetensors): detectors in fp16 (as Ultralytics leaves a
finished fold), classifiers in fp32 and in fp16 (`export half=true`).

    python benchmarks/bundle_sizes.py            # prints MB per fold and the 2 + 2 models x 5 folds total
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from siimcovid import weights


def saved_mb(state: dict, half: bool = False) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"fold0{weights.SUFFIX}"
        weights.save_state(state, path, half)
        return path.stat().st_size / 1e6


def detector_mb(yaml_name: str) -> float:
    from ultralytics.nn.tasks import DetectionModel

    return saved_mb(DetectionModel(yaml_name, nc=1, verbose=False).half().state_dict())


def classifier_mb(name: str) -> tuple[float, float]:
    from siimcovid.classify.model import build_model

    cfg = {"model": name, "in_chans": 3, "drop_rate": 0.3, "drop_path_rate": 0.2, "mask_stride": 16, "none_head": True}
    state = build_model(cfg, pretrained=False).state_dict()
    return saved_mb(state), saved_mb(state, half=True)


def main(folds: int = 5) -> None:
    det = {y: detector_mb(y) for y in ("yolov5m.yaml", "yolov5x.yaml")}
    cls = {n: classifier_mb(n) for n in ("tf_efficientnet_b3_ns", "tf_efficientnet_b5_ns")}
    for name, mb in det.items():
        print(f"{name:24s} {mb:7.1f} MB per fold (fp16, as Ultralytics leaves a finished fold)")
    for name, (full, half) in cls.items():
        print(f"{name:24s} {full:7.1f} MB per fold fp32, {half:6.1f} MB fp16")
    det_total = folds * sum(det.values())
    full_total = det_total + folds * sum(f for f, _ in cls.values())
    half_total = det_total + folds * sum(h for _, h in cls.values())
    print(f"2 detectors + 2 classifiers x {folds} folds: {full_total / 1e3:.2f} GB, {half_total / 1e3:.2f} GB with half=true")


if __name__ == "__main__":
    main()

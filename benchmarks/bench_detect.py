"""Benchmark the detect stage: training images/s and the time to predict the test split.

    python benchmarks/bench_detect.py --device 0                       # GPU: yolov5m, 512 px, AMP on
    python benchmarks/bench_detect.py --device cpu --model yolov5n.yaml --imgsz 128 --train-studies 40

Writes a synthetic dataset in the SIIM layout and prepares it at --imgsz (once, in --work),
then runs the real commands:

  train    `siimcovid detect train` on fold 0 for --epochs epochs (AMP on unless --no-amp; the
           weights are random, which costs the same as pretrained ones). images/s counts the
           training images of each epoch over the epoch's training time (validation excluded);
           the first epoch (warm-up: cudnn autotune, data loader start) is reported apart.
  predict  `siimcovid detect predict split=test` with that fold's model, with TTA and without,
           timed end to end (model load included). Prints seconds, images/s, the TTA cost ratio,
           and the projection to the real test set: 1263 images x 5 folds.

Every figure comes from this run on this machine; the device is printed with them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_TEST_IMAGES, REAL_FOLDS = 1263, 5


def make_data(work: Path, args) -> Path:
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
    from siimcovid.data.synth import generate

    root = work / "siim-synth"
    prepared = work / "prepared" / f"bench{args.imgsz}"
    if not (prepared / "meta.csv").is_file():
        generate(
            load_config(
                "synth",
                {
                    "out": str(root),
                    "train_studies": args.train_studies,
                    "test_studies": args.test_studies,
                    "rows": args.orig,
                    "cols": int(args.orig * 1.2),
                    "seed": 0,
                },
            )
        )
        prepare(
            load_config(
                "prepare",
                {
                    "data": str(root),
                    "name": f"bench{args.imgsz}",
                    "out": str(prepared),
                    "sizes": [args.imgsz],
                    "n_folds": 5,
                    "data_yaml_dir": str(work / "data_yaml"),
                },
            )
        )
    return prepared


def device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(int(str(device).split(",")[0]))
    import os
    import platform

    return f"CPU ({platform.machine()}, {os.cpu_count()} cores)"


def bench_train(prepared: Path, work: Path, args) -> dict:
    from siimcovid.config import load_config
    from siimcovid.detect.common import ultralytics_keys
    from siimcovid.detect.train import train

    name = f"bench-{Path(args.model).stem}-{args.imgsz}-{int(time.time())}"
    cfg = load_config(
        "detect",
        {
            "data": str(prepared),
            "data_yaml_dir": str(work / "data_yaml"),
            "model": args.model,
            "pretrained": False,
            "hyp": args.hyp,
            "fold": 0,
            "epochs": args.epochs,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "device": args.device,
            "workers": args.workers,
            "plots": False,
            "project": str(work / "runs"),
            "name": name,
            "amp": not args.no_amp,
            "val": True,
        },
        extra_ok=ultralytics_keys(),
    )
    epochs: list[tuple[float, int]] = []
    state = {}

    def start(trainer):
        state["t"] = time.perf_counter()

    def end(trainer):
        if trainer.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        state["amp"] = bool(trainer.amp)  # Ultralytics' check_amp may have turned it off
        epochs.append((time.perf_counter() - state["t"], len(trainer.train_loader.dataset)))

    run_dir = train(cfg, callbacks={"on_train_epoch_start": start, "on_train_epoch_end": end})
    if not epochs:
        # several GPUs: Ultralytics trains in torchrun subprocesses, which these callbacks never reach;
        # take the epoch times from results.csv instead (cumulative seconds, validation included)
        epochs = epochs_from_results(run_dir / "fold0")
        state["timing"] = "from results.csv (validation included)"
    return {"run": run_dir, "epochs": epochs, "amp": state.get("amp"), "timing": state.get("timing", "callbacks")}


def epochs_from_results(fold_dir: Path) -> list[tuple[float, int]]:
    """(seconds, training images) per epoch from an Ultralytics run's results.csv (cumulative `time`)."""
    import yaml

    from siimcovid.tables import read_csv

    res = read_csv(fold_dir / "results.csv", ["time"], text=[])  # Ultralytics' numbers, inferred
    data = yaml.safe_load(Path(yaml.safe_load((fold_dir / "args.yaml").read_text())["data"]).read_text())
    train_list = Path(data["train"]) if Path(data["train"]).is_absolute() else Path(data["path"]) / data["train"]
    n_train = len(train_list.read_text().split())
    return [(float(t), n_train) for t in res["time"].diff().fillna(res["time"])]


def bench_predict(run_dir: Path, args, tta: bool) -> tuple[float, int]:
    from siimcovid import cli
    from siimcovid.detect.predict import load_run
    from siimcovid.tables import DETECTIONS

    n_test = len(load_run(run_dir).prepared.split("test"))
    t = time.perf_counter()
    cli.main(
        [
            "detect",
            "predict",
            f"run={run_dir}",
            "split=test",
            f"tta={str(tta).lower()}",
            f"device={args.device}",
            f"batch={args.predict_batch}",
        ]
    )
    seconds = time.perf_counter() - t
    DETECTIONS.read(run_dir / "pred_test.csv")  # written, and to its contract
    return seconds, n_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="0", help="0 (first GPU), 0,1 (DDP) or cpu")
    p.add_argument("--model", default="yolov5m.yaml")
    p.add_argument("--hyp", default="yolov5m")
    p.add_argument("--imgsz", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--predict-batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--train-studies", type=int, default=400, help="synthetic train studies (~1.06 images each)")
    p.add_argument("--test-studies", type=int, default=100)
    p.add_argument("--orig", type=int, default=1024, help="synthetic original height in px (width 1.2x)")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_detect")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    prepared = make_data(args.work, args)
    result = bench_train(prepared, args.work, args)
    with_tta = bench_predict(result["run"], args, tta=True)
    without_tta = bench_predict(result["run"], args, tta=False)

    amp = {True: "on", False: "off"}.get(result["amp"], "requested " + ("off" if args.no_amp else "on"))
    print(
        f"\n=== detect benchmark: {args.model} at {args.imgsz} px, batch {args.batch}, AMP {amp}, "
        f"device {args.device}: {device_name(args.device)} ==="
    )
    for i, (seconds, n) in enumerate(result["epochs"]):
        label = "epoch 1 (warm-up)" if i == 0 else f"epoch {i + 1}"
        print(f"train {label:<18} {n:5d} images {seconds:8.2f} s  {n / seconds:8.1f} images/s")
    steady = result["epochs"][1:] or result["epochs"]
    images, seconds = sum(n for _, n in steady), sum(s for s, _ in steady)
    excluded = "validation excluded" if result["timing"] == "callbacks" else result["timing"]
    print(f"train steady state        {images / seconds:8.1f} images/s ({excluded})")
    for label, (secs, n) in (("predict test, TTA", with_tta), ("predict test, no TTA", without_tta)):
        print(
            f"{label:<25} {n:5d} images {secs:8.2f} s  {n / secs:8.1f} images/s  "
            f"-> {REAL_TEST_IMAGES} images x {REAL_FOLDS} folds: {REAL_TEST_IMAGES * REAL_FOLDS * secs / n:8.1f} s"
        )
    print(f"TTA cost ratio (TTA / no TTA time): {with_tta[0] / without_tta[0]:.2f}")


if __name__ == "__main__":
    main()

"""Benchmark `detect evolve`: N trials serially (Ultralytics' Tuner, engine=serial) vs on a local Ray cluster (engine=ray).

    python benchmarks/bench_ray_evolve.py                       # 4 trials, 2 Ray workers, yolov5n, 64 px, 2 epochs, CPU
    python benchmarks/bench_ray_evolve.py --trials 8 --ray-workers 4 --epochs 3 --imgsz 128

Writes a small synthetic dataset and prepares it (once, in --work), then runs the real command twice on
fold 1 with the same settings, side by side in one run:

  serial  `siimcovid detect evolve ... engine=serial iterations=N` in this process
  ray     a local Ray cluster on 127.0.0.1 with --ray-workers CPUs (ray.init, timed apart), then
          `siimcovid detect evolve ... engine=ray iterations=N grace_period=G` (1 CPU per trial)

Per trial it reads Ultralytics' own training time (results.csv `time`: the epochs and their validations) and,
for Ray, the time inside the trial function (Ray's time_total_s: imports, model and data loader setup, training).
Ray's overhead per trial = (Ray wall time x workers - sum of trial training times) / trials: the worker-seconds
each trial costs beyond its training (cluster start, scheduling, worker start, imports, setup, bookkeeping).
The serial overhead per trial is (serial wall time - sum of training times) / trials, for comparison.
Prints the ratio serial / Ray wall time and, from one trial's training time and the overhead, the trials per hour
that N GPUs would run. Every figure comes from this run on this machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_data(work: Path, args) -> Path:
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
    from siimcovid.data.synth import generate

    root, prepared = work / "siim-synth", work / "prepared" / "benchray"
    if not (prepared / "meta.csv").is_file():
        generate(
            load_config(
                "synth",
                {
                    "out": str(root),
                    "train_studies": args.train_studies,
                    "test_studies": 4,
                    "rows": 256,
                    "cols": 300,
                    "seed": 7,
                    "workers": 1,
                },
            )
        )
        prepare(
            load_config(
                "prepare",
                {
                    "data": str(root),
                    "name": "benchray",
                    "out": str(prepared),
                    "sizes": [args.imgsz],
                    "n_folds": 3,
                    "workers": 1,
                    "data_yaml_dir": str(work / "data_yaml"),
                },
            )
        )
    return prepared


def last_time(results_csv: Path) -> float:
    import pandas as pd

    res = pd.read_csv(results_csv)
    res.columns = [c.strip() for c in res.columns]
    return float(res["time"].iloc[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/siimcovid-bench-ray-evolve"))
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--ray-workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--grace-period", type=int, default=1)
    p.add_argument("--imgsz", type=int, default=64)
    p.add_argument("--train-studies", type=int, default=48)
    p.add_argument("--model", default="yolov5n.yaml")
    args = p.parse_args()

    import ray

    from siimcovid import cli

    prepared = make_data(args.work, args)
    project = args.work / "runs"
    shutil.rmtree(project, ignore_errors=True)
    common = [
        f"data={prepared}",
        f"model={args.model}",
        "pretrained=false",
        f"epochs={args.epochs}",
        f"imgsz={args.imgsz}",
        "batch=8",
        "workers=0",
        "device=cpu",
        "plots=false",
        f"project={project}",
        "fold=1",
        f"iterations={args.trials}",
    ]

    # Ultralytics' Tuner trains each iteration in a `yolo train` subprocess and deletes the runs that were not the best:
    # each one's training time is read as soon as its subprocess ends
    serial_train, serial_process = [], []
    run_subprocess = subprocess.run

    def timed_run(*a, **k):
        t, started = time.perf_counter(), time.time()
        out = run_subprocess(*a, **k)
        new = [c for c in (project / "serial").glob("**/results.csv") if c.stat().st_mtime >= started]
        if new:
            serial_train.extend(last_time(c) for c in new)
            serial_process.append(time.perf_counter() - t)
        return out

    subprocess.run = timed_run
    t0 = time.perf_counter()
    try:
        cli.main(["detect", "evolve", *common, "name=serial", "engine=serial"])
    finally:
        subprocess.run = run_subprocess
    serial_wall = time.perf_counter() - t0

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=args.ray_workers,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    ray_start = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        cli.main(["detect", "evolve", *common, "name=ray", "engine=ray", f"grace_period={args.grace_period}"])
        ray_evolve = time.perf_counter() - t1
    finally:
        ray.shutdown()
    ray_wall = ray_start + ray_evolve

    run = project / "ray"
    ray_train = [last_time(csv) for csv in sorted((run / "trials").glob("*/results.csv"))]
    in_trial = []
    for result in sorted((run / "ray_tune").glob("*/result.json")):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        in_trial.append(float(lines[-1]["time_total_s"]))
    n, w = args.trials, args.ray_workers
    assert len(serial_train) == n and len(ray_train) == n, (serial_train, ray_train)

    ray_overhead = (ray_wall * w - sum(ray_train)) / n  # every worker-second not spent training, cluster start included
    recurring = (ray_evolve * w - sum(ray_train)) / n  # the same without the one-off cluster start
    setup_in_trial = (sum(in_trial) - sum(ray_train)) / n  # of which inside the trial function
    serial_overhead = (serial_wall - sum(serial_train)) / n
    one_trial = sum(serial_train) / n  # one trial's training on the whole machine (serial: every core)
    print(f"\n{n} evolve trials, {args.model} {args.imgsz} px, {args.epochs} epochs, CPU ({w} Ray workers, 1 CPU each)")
    print(
        f"  serial (Ultralytics Tuner): {serial_wall:6.1f} s wall; training {sum(serial_train):.1f} s "
        f"({one_trial:.1f} s / trial); each trial's `yolo train` process {sum(serial_process) / n:.1f} s; "
        f"overhead {serial_overhead:.1f} s / trial"
    )
    print(
        f"  ray ({w} workers):          {ray_wall:6.1f} s wall (cluster start {ray_start:.1f} s + evolve {ray_evolve:.1f} s); "
        f"training {sum(ray_train):.1f} s ({sum(ray_train) / n:.1f} s / trial); trial function {sum(in_trial) / n:.1f} s / trial"
    )
    print(f"  ratio serial / ray wall time: {serial_wall / ray_wall:.2f}")
    print(
        f"  Ray overhead per trial: {ray_overhead:.1f} worker-s with the cluster start, {recurring:.1f} without it "
        f"({setup_in_trial:.1f} s inside the trial function: imports, model and data loader setup; "
        f"{recurring - setup_in_trial:.1f} s scheduling, worker start, results)"
    )
    print(f"  trials per hour on G GPUs, one trial per GPU: G x 3600 / (training s + {recurring:.0f} s)")
    for gpus in (1, 8, 32):
        print(
            f"    {gpus:2d} GPUs: {gpus * 3600 / (one_trial + recurring):7.1f} at this run's {one_trial:.1f} s of training, "
            f"{gpus * 3600 / (600 + recurring):6.1f} at 600 s"
        )


if __name__ == "__main__":
    main()

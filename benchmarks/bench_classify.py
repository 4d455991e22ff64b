"""Benchmark classifier training throughput (images/s) and whether the data loader keeps up.

    python benchmarks/bench_classify.py                        # picks the defaults for the machine
    python benchmarks/bench_classify.py --model efficientnet_b3 --imgsz 512 --batch 32 --workers 8

Two measurements, side by side in one run:

1. compute: train steps (forward, loss with the mask head, backward, AdamW step) of the
   real StudyNet on a batch already on the device, so only the model's speed counts.
   On a GPU: plain fp32 (NCHW) against AMP + channels_last, and their ratio.
   On CPU: fp32 only (AMP and channels_last are GPU features here). The best of --rounds
   rounds is reported: on a shared machine the slower rounds measure the neighbours.
2. pipeline: one epoch of the real training loop (FoldTrainer.train_one_epoch: the prepared
   PNGs, albumentations, the DataLoader, EMA, scheduler) on a synthetic prepared dataset
   written once at --imgsz. Prints images/s (fastest epoch after the first) and the loader wait fraction (share of the epoch
   spent waiting for the next batch: near 0 = the loader keeps the device busy), and the
   pipeline's images/s as a share of the compute-only figure.

Defaults: GPU: efficientnet_b3 at 512 px, batch 32, all CPU cores as loader workers;
CPU: resnet10t at 128 px, batch 16, 2 workers. pretrained=False (speed does not depend on
the weights). The synthetic dataset goes to --work (default /tmp/siimcovid_bench_classify).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from siimcovid.classify.data import to_device  # noqa: E402
from siimcovid.classify.dist import Dist  # noqa: E402
from siimcovid.classify.model import StudyLoss, build_model, model_cfg  # noqa: E402
from siimcovid.classify.predict import amp_dtype_for  # noqa: E402
from siimcovid.config import load_config  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_only(cfg, device, amp: bool, channels_last: bool, steps: int, warmup: int, rounds: int) -> float:
    """Images/s of train steps on a device-resident batch: the best of `rounds` rounds of `steps` steps
    (the least disturbed round; on a shared machine the others measure the neighbours)."""
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler

    torch.manual_seed(0)
    model = build_model(model_cfg(cfg), channels_last=channels_last).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_fn = StudyLoss.from_cfg(cfg)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.01)
    amp_dtype = amp_dtype_for(device, amp)
    scaler = NativeScaler("cuda") if amp_dtype == torch.float16 else None  # as the training loop (FoldTrainer.backward_step)
    n, s = cfg.batch, cfg.imgsz
    batch = to_device(
        {
            "image": torch.randint(0, 256, (n, 1, s, s), dtype=torch.uint8),
            "mask": (torch.rand(n, 1, s, s) > 0.8).to(torch.uint8) * 255,
            "label": torch.randint(0, 4, (n,)),
            "none": torch.randint(0, 2, (n,)).float(),
            "index": torch.arange(n),
        },
        device,
    )
    model.train()

    def step():
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(batch["image"])
        loss = loss_fn(out, batch["label"], batch["none"], batch["mask"])["loss"]
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler(loss, opt)
        else:
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    rate = 0.0
    for _ in range(rounds):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rate = max(rate, steps * n / (time.perf_counter() - t))
    return rate


def synthetic_prepared(work: Path, imgsz: int, studies: int) -> Path:
    """A synthetic SIIM root prepared at imgsz (written once, reused by later runs)."""
    from siimcovid.data.prepare import prepare
    from siimcovid.data.prepared import Prepared
    from siimcovid.data.synth import generate

    out = work / f"prepared_{studies}"
    try:
        if imgsz in Prepared(out).sizes:
            return out
    except Exception:
        pass
    root = work / f"synth_{studies}"
    if not (root / "train_study_level.csv").is_file():
        generate(load_config("synth", {"out": str(root), "train_studies": studies, "test_studies": 2, "seed": 1}))
    sizes = sorted({imgsz} | (set(Prepared(out).sizes) if (out / "meta.csv").is_file() else set()))
    prepare(
        load_config(
            "prepare",
            {
                "data": str(root),
                "out": str(out),
                "name": "bench",
                "sizes": sizes,
                "n_folds": 5,
                "data_yaml_dir": str(work / "data_yaml"),
                "splits": ["train"],
            },
        )
    )
    return out


def pipeline(cfg, device, epochs: int) -> dict:
    """The real training loop on real files: images/s and the loader wait fraction of the last epoch."""
    from siimcovid.classify.train import FoldTrainer
    from siimcovid.data.prepared import Prepared

    prep = Prepared(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = FoldTrainer(cfg, prep, 0, cfg.imgsz, Path(tmp), Dist(device=device))
        trainer.new_ema()
        opt, sched = trainer.new_optimizer(cfg.lr, epochs, 0)
        step, best = 0, {}
        for epoch in range(1, epochs + 1):
            stats, step = trainer.train_one_epoch(epoch, opt, sched, step)
            # The first epoch pays worker start-up; of the others report the fastest (least disturbed).
            if epoch > 1 and stats["train_img_s"] > best.get("train_img_s", 0):
                best = stats
        best["steps"] = step // epochs
    return best


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="efficientnet_b3" if gpu else "resnet10t")
    ap.add_argument("--imgsz", type=int, default=512 if gpu else 128)
    ap.add_argument("--batch", type=int, default=32 if gpu else 16)
    ap.add_argument("--steps", type=int, default=30 if gpu else 8, help="timed compute-only steps")
    ap.add_argument("--warmup", type=int, default=5 if gpu else 2, help="untimed steps first (cudnn autotune, allocator)")
    ap.add_argument("--rounds", type=int, default=3, help="compute-only rounds; the best is reported")
    ap.add_argument("--workers", type=int, default=(os.cpu_count() or 2) if gpu else 2)
    ap.add_argument("--studies", type=int, default=400 if gpu else 120, help="synthetic train studies for the pipeline")
    ap.add_argument("--epochs", type=int, default=3, help="pipeline epochs; the best after the first is reported")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "siimcovid_bench_classify"))
    ap.add_argument("--no-pipeline", action="store_true", help="only the compute-only comparison")
    args = ap.parse_args()

    device = torch.device("cuda" if gpu else "cpu")
    if gpu:
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    cfg = load_config(
        "classify",
        {
            "model": args.model,
            "imgsz": args.imgsz,
            "batch": args.batch,
            "pretrained": False,
            "workers": args.workers,
            "device": device.type,
            "amp": True,
            "channels_last": True,
        },
    )
    print(f"device: {name} | model {args.model} at {args.imgsz} px, batch {args.batch} | torch {torch.__version__}")

    print("\n1. compute only (batch on the device, train steps: forward + mask/none/study loss + backward + AdamW)")
    fp32 = compute_only(cfg, device, amp=False, channels_last=False, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
    # cuDNN runs fp32 convolutions in TF32 by default on Ampere+: say so rather than call it plain fp32
    label = "fp32 (TF32 conv), NCHW" if gpu and torch.backends.cudnn.allow_tf32 else "fp32, NCHW"
    print(f"   {label:<24} {fp32:9.1f} img/s")
    fast = None
    if gpu:
        torch.cuda.empty_cache()  # the fp32 model is gone; give its cached memory back
        fast = compute_only(cfg, device, amp=True, channels_last=True, steps=args.steps, warmup=args.warmup, rounds=args.rounds)
        amp_name = str(amp_dtype_for(device, True)).replace("torch.", "")
        print(f"   AMP ({amp_name}) + channels_last {fast:9.1f} img/s   ({fast / fp32:.2f}x fp32)")
    else:
        print("   AMP + channels_last      not measured: no GPU here (the training loop uses them on CUDA only)")

    if args.no_pipeline:
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    cfg.data = str(synthetic_prepared(work, args.imgsz, args.studies))
    print(
        f"\n2. pipeline: the real training loop on prepared PNGs at {args.imgsz} px "
        f"(data ready in {time.perf_counter() - t:.0f} s: {cfg.data})"
    )
    stats = pipeline(cfg, device, args.epochs)
    best = fast or fp32
    mode = "AMP + channels_last" if gpu else "fp32"
    print(
        f"   {mode}, {args.workers} loader workers: {stats['train_img_s']:.1f} img/s "
        f"(best epoch of 2..{args.epochs}, {stats['steps']} steps each; includes EMA and the per-step loss sync)"
    )
    print(
        f"   loader wait: {100 * stats['loader_wait']:.1f}% of the epoch; pipeline / compute-only: "
        f"{stats['train_img_s'] / best:.2f}"
    )
    verdict = "keeps the device busy" if stats["loader_wait"] < 0.1 else "starves the device: more workers or jpg/smaller images"
    print(f"   -> the data loader {verdict}")


if __name__ == "__main__":
    main()

"""Benchmark the time cost of the classifier's TTA views: classify inference with tta=none, hflip, vflip and d4.

    python benchmarks/bench_tta.py                               # CPU: resnet10t, 64 images at 128 px, batch 16
    python benchmarks/bench_tta.py --device cuda --model tf_efficientnet_b3_ns --imgsz 512 --images 256 --batch 32

Each TTA setting runs siimcovid.classify.predict.infer (the loop `classify predict` runs: the views made of each batch
on the device, their probabilities averaged) over the same images, already decoded in memory, so that the figure is
the model's cost of the views and not the loader's (a loader reads each image once whatever the views). The settings
take turns round after round and each reports its best round: on a shared machine the slower rounds measure the
neighbours. Printed: seconds, images/s and the time against tta=none; with n views the ratio is about n (the forward
passes are the cost). The model is real (build_model, pretrained=False: speed does not depend on the weights); on CUDA
with AMP and channels_last, as predict runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from siimcovid.classify.model import build_model, model_cfg  # noqa: E402
from siimcovid.classify.predict import amp_dtype_for, infer  # noqa: E402
from siimcovid.classify.tta import TTA_NAMES, tta_views  # noqa: E402
from siimcovid.config import load_config  # noqa: E402


def batches(n: int, size: int, batch: int) -> list[dict]:
    """n random uint8 images in batches, as the loader hands them to infer (the image, its index)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)
    return [{"image": images[i : i + batch], "index": torch.arange(i, min(i + batch, n))} for i in range(0, n, batch)]


def timed(model, data: list[dict], device, amp_dtype, tta: str) -> float:
    """Seconds of one infer pass over the batches (the device synchronised at the end)."""
    start = time.perf_counter()
    infer(model, data, device, amp_dtype, tta=tta)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", default="resnet10t")
    ap.add_argument("--imgsz", type=int, default=128)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every setting in turn; the best of each is reported")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    cfg = load_config("classify", {"model": args.model, "imgsz": args.imgsz, "pretrained": False, "device": args.device})
    model = build_model(model_cfg(cfg), pretrained=False, channels_last=cuda).to(device)
    if cuda:
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    amp_dtype = amp_dtype_for(device, True)
    data = batches(args.images, args.imgsz, args.batch)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name} | {args.model} at {args.imgsz} px, {args.images} images, batch {args.batch}, "
          f"{'AMP ' + str(amp_dtype).replace('torch.', '') if amp_dtype else 'fp32'} | torch {torch.__version__}")  # fmt: skip

    timed(model, data[:1], device, amp_dtype, "d4")  # warm-up: allocator, cudnn autotune, every view's shapes
    best = {t: float("inf") for t in TTA_NAMES}
    for _ in range(args.rounds):
        for tta in TTA_NAMES:
            best[tta] = min(best[tta], timed(model, data, device, amp_dtype, tta))

    print(f"\n{'tta':<6} {'views':>5} {'seconds':>8} {'images/s':>9} {'x none':>7}")
    for tta in TTA_NAMES:
        secs = best[tta]
        print(f"{tta:<6} {len(tta_views(tta)):>5} {secs:8.3f} {args.images / secs:9.1f} {secs / best['none']:7.2f}")


if __name__ == "__main__":
    main()

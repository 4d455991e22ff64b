"""Benchmark `siimcovid prepare` against the naive recipe on real-size synthetic DICOMs.

    python benchmarks/bench_prepare.py [--images 16] [--compressed 0.35] [--sizes 512] [--ext png]

Writes synthetic DICOMs of real size (about 2544 x 3028, 10-16 bit, some compressed) once
into --work, then measures, each method in a fresh process (so peak memory is its own):

  decode      pure read + decode: pydicom.dcmread(f).pixel_array, one process
  decode-min  the leanest pydicom read + decode: pydicom.pixels.pixel_array(f), one process
  naive       the public-notebook recipe, one process: dcmread, apply_voi_lut, MONOCHROME1
              inversion, min-max, cv2.resize, cv2.imwrite
  prepare-1   `siimcovid prepare` with workers=1 (everything: CSVs, conversion, labels,
              masks, folds, meta), i.e. its cost per core
  prepare-N   `siimcovid prepare` with all cores
  prepare-re  a re-run of prepare-N on finished output (resume: header reads only)

All reads come from the page cache (the files are read once before timing). Each method
runs on n and 2n images; the difference gives the marginal cost per image, free of fixed
costs (imports, worker start, CSV parsing, folds), which are printed apart and projected
to the size of the real dataset. Prints ms/image, images/s, peak RSS and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
method, data, out, sizes, ext, workers = {method!r}, {data!r}, {out!r}, {sizes!r}, {ext!r}, {workers!r}
import cv2, pydicom
from pydicom.pixels import pixel_array
from siimcovid.data.siim import Problems, find_dicoms
files = list(find_dicoms(os.path.join(data, "train")).path)
cv2.setNumThreads(1)
t = time.perf_counter()
if method == "decode":
    for f in files:
        pydicom.dcmread(f).pixel_array
elif method == "decode-min":
    for f in files:
        pixel_array(f)
elif method == "naive":
    from siimcovid.data.dicom import naive_dicom_to_uint8
    os.makedirs(out, exist_ok=True)
    t = time.perf_counter()
    for f in files:
        for s in sizes:
            cv2.imwrite(os.path.join(out, f"{{s}}_" + os.path.basename(f)[:-4] + "." + ext), naive_dicom_to_uint8(f, s))
else:
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
    t = time.perf_counter()
    prepare(load_config("prepare", dict(data=data, out=out, sizes=sizes, ext=ext, workers=workers,
                                           data_yaml_dir=os.path.join(out, "data_yaml"), n_folds=2)))
dt = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT", json.dumps(dict(seconds=dt, n=len(files), peak_mb=peak / 1024)))
"""


def run_child(method: str, data: Path, out: Path, sizes: list[int], ext: str, workers: int) -> dict:
    code = CHILD.format(root=str(ROOT), method=method, data=str(data), out=str(out), sizes=sizes, ext=ext, workers=workers)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def make_data(work: Path, n: int, compressed: float, seed: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from siimcovid.config import load_config
    from siimcovid.data.synth import generate

    data = work / f"synth-{n}-c{compressed}-s{seed}"
    cfg = load_config(
        "synth",
        dict(out=str(data), train_studies=n, test_studies=0, rows=2544, cols=3028, size_jitter=0.15,
             compressed=compressed, multi_image_studies=0.0, seed=seed),
    )
    generate(cfg)
    for f in data.rglob("*.dcm"):  # warm the page cache
        f.read_bytes()
    return data


METHODS = [("decode", 1), ("decode-min", 1), ("naive", 1), ("prepare-1", 1), ("prepare-N", os.cpu_count() or 1), ("prepare-re", os.cpu_count() or 1)]


def measure(data: Path, work: Path, sizes: list[int], ext: str) -> dict:
    results = {}
    for method, workers in METHODS:
        out = work / f"out-{data.name}-{'prepare-N' if method == 'prepare-re' else method}"
        if method != "prepare-re" and out.exists():
            shutil.rmtree(out)
        results[method] = run_child("prepare" if method.startswith("prepare") else method, data, out, sizes, ext, workers)
    return results


def bench(label: str, small: dict, large: dict, sizes: list[int], ext: str, real_n: int = 7597) -> None:
    """Per-image (marginal) cost from two runs of n and 2n images, so fixed costs (imports,
    process start, CSV parsing, folds) do not swamp a small benchmark set."""
    cores = os.cpu_count() or 1
    n1, n2 = small["decode"]["n"], large["decode"]["n"]
    per, fixed = {}, {}
    for m in small:
        per[m] = 1000 * (large[m]["seconds"] - small[m]["seconds"]) / (n2 - n1)
        fixed[m] = max(small[m]["seconds"] - n1 * per[m] / 1000, 0.0)
    print(f"\n== {label}: DICOMs of ~2544x3028 (10-16 bit), sizes {sizes}, {ext}, {cores} cores; runs of {n1} and {n2} images ==")
    print(f"{'method':<12} {'ms/img':>8} {'img/s':>8} {'fixed s':>8} {'peak MB':>8}   (ms/img: marginal cost of one more image)")
    for m in small:
        print(f"{m:<12} {per[m]:8.1f} {1000 / per[m]:8.1f} {fixed[m]:8.2f} {large[m]['peak_mb']:8.0f}")
    proj = lambda m: (fixed[m] + real_n * per[m] / 1000) / (real_n * per["decode"] / 1000)  # noqa: E731
    print(f"prepare, 1 core / pure read+decode (dcmread().pixel_array):   {per['prepare-1'] / per['decode']:.2f}x   (target <= 1.2x)")
    print(f"  the same with fixed costs, projected to the real {real_n} images: {proj('prepare-1'):.2f}x")
    print(f"prepare, 1 core / leanest read+decode (pixels.pixel_array):   {per['prepare-1'] / per['decode-min']:.2f}x")
    print(f"naive recipe    / pure read+decode:                            {per['naive'] / per['decode']:.2f}x")
    print(f"prepare speed-up over the naive recipe, both on 1 core:        {per['naive'] / per['prepare-1']:.2f}x")
    print(f"prepare on {cores} cores, speed-up over 1 core:                     {per['prepare-1'] / per['prepare-N']:.2f}x")
    print(f"re-run on finished output (resume), per image:                 {per['prepare-re']:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16, help="the small run; the large run has twice as many")
    ap.add_argument("--compressed", type=float, default=0.35, help="fraction compressed in the mixed set")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    ap.add_argument("--ext", default="png", choices=["png", "jpg"])
    ap.add_argument("--work", type=Path, default=Path("runs/bench_prepare"))
    ap.add_argument("--only", choices=["uncompressed", "mixed"], default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for compressed, label in [(0.0, "uncompressed"), (args.compressed, "mixed")]:
        if args.only and args.only != label:
            continue
        runs = [measure(make_data(args.work, n, compressed, seed=1), args.work, args.sizes, args.ext) for n in (args.images, 2 * args.images)]
        bench(label, *runs, args.sizes, args.ext)


if __name__ == "__main__":
    main()

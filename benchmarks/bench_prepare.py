"""Benchmark `siimcovid prepare` against the naive recipe on real-size synthetic DICOMs.

    python benchmarks/bench_prepare.py [--images 24] [--compressed 0.35] [--sizes 512] [--ext png]

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

All reads come from the page cache (the files are read once before timing). Prints
images/s, ms/image, peak RSS, and the ratios the issue asks for.
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
    for f in files:
        for s in sizes:
            cv2.imwrite(os.path.join(out, f"{{s}}_" + os.path.basename(f)[:-4] + "." + ext), naive_dicom_to_uint8(f, s))
else:
    from siimcovid.config import load_config
    from siimcovid.data.prepare import prepare
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


def make_data(work: Path, n: int, compressed: float, uncompressed_only: bool) -> Path:
    sys.path.insert(0, str(ROOT))
    from siimcovid.config import load_config
    from siimcovid.data.synth import generate

    tag = "u" if uncompressed_only else f"c{compressed}"
    data = work / f"synth-{n}-{tag}"
    cfg = load_config(
        "synth",
        dict(
            out=str(data),
            train_studies=n,
            test_studies=0,
            rows=2544,
            cols=3028,
            size_jitter=0.15,
            compressed=0.0 if uncompressed_only else compressed,
            multi_image_studies=0.0,
            seed=1,
        ),
    )
    generate(cfg)
    for f in data.rglob("*.dcm"):  # warm the page cache
        f.read_bytes()
    return data


def bench(data: Path, work: Path, sizes: list[int], ext: str, label: str) -> None:
    cores = os.cpu_count() or 1
    results = {}
    for method, workers in [
        ("decode", 1),
        ("decode-min", 1),
        ("naive", 1),
        ("prepare-1", 1),
        ("prepare-N", cores),
        ("prepare-re", cores),
    ]:
        out = work / f"out-{label}-{method if method != 'prepare-re' else 'prepare-N'}"
        if method != "prepare-re" and out.exists():
            shutil.rmtree(out)
        results[method] = run_child("prepare" if method.startswith("prepare") else method, data, out, sizes, ext, workers)
    n = results["decode"]["n"]
    print(f"\n== {label}: {n} DICOMs of ~2544x3028, sizes {sizes}, {ext}, {cores} cores ==")
    print(f"{'method':<12} {'img/s':>8} {'ms/img':>8} {'peak MB':>8}")
    for m, r in results.items():
        print(f"{m:<12} {n / r['seconds']:8.2f} {1000 * r['seconds'] / n:8.1f} {r['peak_mb']:8.0f}")
    ms = {m: 1000 * r["seconds"] / n for m, r in results.items()}
    print(f"prepare (1 core) / pure read+decode (dcmread.pixel_array):   {ms['prepare-1'] / ms['decode']:.2f}x  (target <= 1.2x)")
    print(f"prepare (1 core) / leanest read+decode (pixels.pixel_array): {ms['prepare-1'] / ms['decode-min']:.2f}x")
    print(f"naive recipe     / pure read+decode:                         {ms['naive'] / ms['decode']:.2f}x")
    print(f"prepare (1 core) speed-up over naive:                        {ms['naive'] / ms['prepare-1']:.2f}x")
    print(f"prepare ({cores} cores) speed-up over 1 core:                   {ms['prepare-1'] / ms['prepare-N']:.2f}x")
    print(f"re-run on finished output (resume) / first run:              {ms['prepare-re'] / ms['prepare-N']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--compressed", type=float, default=0.35, help="fraction compressed in the mixed set")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    ap.add_argument("--ext", default="png", choices=["png", "jpg"])
    ap.add_argument("--work", type=Path, default=Path("runs/bench_prepare"))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for uncompressed_only, label in [(True, "uncompressed"), (False, "mixed")]:
        data = make_data(args.work, args.images, args.compressed, uncompressed_only)
        bench(data, args.work, args.sizes, args.ext, label)


if __name__ == "__main__":
    main()

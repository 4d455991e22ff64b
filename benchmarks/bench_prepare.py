"""Benchmark `siimcovid prepare` against the naive recipe on real-size synthetic DICOMs.

    python benchmarks/bench_prepare.py [--images 48] [--compressed 0.35] [--sizes 512]

Writes synthetic DICOMs of real size (about 2544 x 3028, 10-16 bit) once into --work: one
uncompressed set and one mixed set (a share compressed with RLE, JPEG 2000 or JPEG-LS).
All reads come from the page cache (every file is read once before timing).

Part 1, cost per image on one core, measured interleaved: for each file in turn, every method
runs on it (best of --repeat), so drift in the machine's speed hits all methods alike:

  decode       pure read + decode: pydicom.dcmread(f).pixel_array
  decode-min   the leanest pydicom read + decode: pydicom.pixels.pixel_array(f)
  naive        the public-notebook recipe: dcmread, apply_voi_lut, MONOCHROME1 inversion,
               min-max, cv2.resize, cv2.imwrite (PNG)
  prepare      what one `siimcovid prepare` worker does per image with the default settings:
               decode, convert, write the image (stored PNG, png_level=0), the YOLO label and
               the mask (siimcovid.data.convert.convert_one)
  prepare-png1 the same with png_level=1 (compressed PNG, ~3x smaller)
  prepare-jpg  the same with ext=jpg

Part 2, the whole command in a fresh process (CSV parsing, folds, meta table, worker start):
`siimcovid prepare` with 1 worker and with all cores, then a re-run on the finished output
(resume), with images/s and peak memory (RSS of the process and its largest worker).

Part 3 (--resume-only runs just this): the cost of checking that a finished image is whole on
resume (siimcovid.data.convert.image_is_whole: PNG/JPEG head and tail, two small reads) against
trusting any file that exists (os.path.exists, before), side by side on the same finished folder:
per file (best of --repeat, interleaved), and whole re-runs of prepare in one process (workers=1,
so the check can be swapped), alternating the two checks, --repeat runs each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from siimcovid.config import load_config
from siimcovid.data.prepare import prepare
t = time.perf_counter()
prepare(load_config("prepare", dict(data={data!r}, out={out!r}, sizes={sizes!r}, workers={workers!r},
                                       data_yaml_dir={out!r} + "/data_yaml", n_folds=2)))
dt = time.perf_counter() - t
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("RESULT", json.dumps(dict(seconds=dt, peak_mb=peak / 1024)))
"""


def make_data(work: Path, n: int, compressed: float) -> Path:
    from siimcovid.config import load_config
    from siimcovid.data.synth import generate

    data = work / f"synth-{n}-c{compressed}"
    cfg = load_config(
        "synth",
        dict(
            out=str(data),
            train_studies=n,
            test_studies=0,
            rows=2544,
            cols=3028,
            size_jitter=0.15,
            compressed=compressed,
            multi_image_studies=0.0,
            seed=1,
        ),
    )
    generate(cfg)
    for f in data.rglob("*.dcm"):  # warm the page cache
        f.read_bytes()
    return data


def per_image(files: list[str], sizes: list[int], repeat: int) -> dict[str, float]:
    """Summed best-of-`repeat` seconds per method over all files, methods interleaved per file."""
    import cv2
    import pydicom
    from pydicom.pixels import pixel_array

    from siimcovid.data.convert import convert_one, encode_params, init_worker
    from siimcovid.data.dicom import naive_dicom_to_uint8

    init_worker()  # one thread, as in a prepare worker
    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    for s in sizes:
        for sub in ("images/train", "labels/train", "masks/train"):
            (tmp / str(s) / sub).mkdir(parents=True, exist_ok=True)

    def job(f, ext, level=0):
        return dict(
            out=str(tmp),
            sizes=sizes,
            ext=ext,
            params=encode_params(ext, level),
            image_id=f"{Path(f).stem}{level}",
            split="train",
            path=f,
            boxes=[[600, 700, 1100, 1500]],
            line=2,
            csv="bench",
        )

    def clear(f, ext, level=0):
        for s in sizes:
            (tmp / str(s) / "images" / "train" / f"{Path(f).stem}{level}.{ext}").unlink(missing_ok=True)

    methods = {
        "decode": lambda f: pydicom.dcmread(f).pixel_array,
        "decode-min": lambda f: pixel_array(f),
        "naive": lambda f: [cv2.imwrite(str(tmp / f"naive{s}.png"), naive_dicom_to_uint8(f, s)) for s in sizes],
        "prepare": lambda f: (clear(f, "png"), convert_one(job(f, "png"))),
        "prepare-png1": lambda f: (clear(f, "png", 1), convert_one(job(f, "png", 1))),
        "prepare-jpg": lambda f: (clear(f, "jpg"), convert_one(job(f, "jpg"))),
    }
    total = dict.fromkeys(methods, 0.0)
    for f in files:
        for name, fn in methods.items():
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                fn(f)
                best = min(best, time.perf_counter() - t)
            total[name] += best
    shutil.rmtree(tmp)
    return total


def whole_command(data: Path, work: Path, sizes: list[int], workers: int, fresh: bool) -> dict:
    out = work / f"out-{data.name}-w{workers}"
    if fresh and out.exists():
        shutil.rmtree(out)
    code = CHILD.format(root=str(ROOT), data=str(data), out=str(out), sizes=sizes, workers=workers)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"prepare failed:\n{proc.stderr[-3000:]}")
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1][len("RESULT ") :])


def bench(data: Path, work: Path, sizes: list[int], repeat: int, label: str) -> None:
    from siimcovid.data.siim import find_dicoms

    files = list(find_dicoms(data / "train").path)
    n, cores = len(files), os.cpu_count() or 1
    cost = per_image(files, sizes, repeat)
    ms = {k: 1000 * v / n for k, v in cost.items()}
    print(f"\n== {label}: {n} DICOMs of ~2544 x 3028 (10-16 bit), sizes {sizes} ==")
    print("Part 1: cost per image on one core (interleaved, best of %d)" % repeat)
    print(f"{'method':<13} {'ms/img':>8} {'img/s':>8} {'x decode':>9}")
    for k, v in ms.items():
        print(f"{k:<13} {v:8.1f} {1000 / v:8.1f} {v / ms['decode']:9.2f}")
    print(f"prepare / pure read+decode (dcmread().pixel_array):     {ms['prepare'] / ms['decode']:.2f}x  (target <= 1.2x)")
    print(f"prepare, png_level=1 / pure read+decode:                {ms['prepare-png1'] / ms['decode']:.2f}x")
    print(f"prepare, ext=jpg / pure read+decode:                    {ms['prepare-jpg'] / ms['decode']:.2f}x")
    print(f"prepare / leanest read+decode (pydicom.pixels.pixel_array): {ms['prepare'] / ms['decode-min']:.2f}x")
    print(f"naive recipe / pure read+decode:                        {ms['naive'] / ms['decode']:.2f}x")
    print(f"prepare speed-up over the naive recipe:                 {ms['naive'] / ms['prepare']:.2f}x")

    one = whole_command(data, work, sizes, 1, fresh=True)
    many = whole_command(data, work, sizes, cores, fresh=True)
    again = whole_command(data, work, sizes, cores, fresh=False)
    print(f"Part 2: `siimcovid prepare` on the {n} files, whole command")
    print(f"{'run':<28} {'seconds':>8} {'img/s':>8} {'peak MB':>8}")
    for name, r in [("1 worker", one), (f"{cores} workers", many), (f"re-run, {cores} workers (resume)", again)]:
        print(f"{name:<28} {r['seconds']:8.2f} {n / r['seconds']:8.1f} {r['peak_mb']:8.0f}")
    fixed = one["seconds"] - cost["prepare"]
    print(
        f"fixed cost of one run (imports, CSVs, folds, meta; 1 worker): {fixed:.2f} s "
        f"-> {1000 * fixed / 7597:.2f} ms per image at the real dataset's 7,597 images"
    )
    print(f"speed-up with {cores} workers over 1 (worker start included):  {one['seconds'] / many['seconds']:.2f}x")


def resume_check(data: Path, work: Path, sizes: list[int], repeat: int) -> None:
    """Part 3: resume with the whole-image check vs with a plain existence check, on the same finished folder."""
    import statistics

    from siimcovid.config import load_config
    from siimcovid.data import convert
    from siimcovid.data.dicom import read_header
    from siimcovid.data.prepare import prepare
    from siimcovid.data.siim import find_dicoms
    from siimcovid.utils import LOGGER

    out = work / f"out-{data.name}-resume"
    cfg = load_config("prepare", dict(data=str(data), out=str(out), sizes=sizes, workers=1, n_folds=2,
                                      data_yaml_dir=str(out / "data_yaml")))  # fmt: skip
    prepare(cfg)  # finished (or resumed to finished)
    images = sorted((out / str(sizes[0]) / "images" / "train").glob("*.png"))
    dicoms = list(find_dicoms(data / "train").path)
    whole = convert.image_is_whole
    checks = {
        "exists (before)": lambda p: p.exists(),
        "image_is_whole": lambda p: whole(p, sizes[0], "png"),
        "read_header (DICOM)": None,  # what every resumed image costs anyway
    }
    best = dict.fromkeys(checks, float("inf"))
    for _ in range(repeat):
        for name, fn in checks.items():
            t = time.perf_counter()
            if fn is None:
                for d in dicoms:
                    read_header(d)
            else:
                assert all(fn(p) for p in images)
            best[name] = min(best[name], time.perf_counter() - t)
    n = len(images)
    print(f"\n== Part 3: resume on a finished folder, {n} images, sizes {sizes} ==")
    print(f"per image, best of {repeat}:")
    for name, v in best.items():
        print(f"  {name:<22} {1e6 * v / n:8.1f} us")
    runs = {"exists (before)": [], "image_is_whole (after)": []}
    level = LOGGER.level
    LOGGER.setLevel("WARNING")  # the runs' summaries would bury the table
    try:
        for _ in range(repeat):
            for name in runs:
                convert.image_is_whole = (lambda p, s, e: Path(p).exists()) if name.startswith("exists") else whole
                t = time.perf_counter()
                prepare(cfg)
                runs[name].append(time.perf_counter() - t)
    finally:
        convert.image_is_whole = whole
        LOGGER.setLevel(level)
    print(f"whole re-run of prepare in one process (workers=1), {repeat} runs each, alternating:")
    print(f"  {'check':<24} {'best s':>8} {'median s':>9} {'ms/img':>8}")
    for name, v in runs.items():
        print(f"  {name:<24} {min(v):8.3f} {statistics.median(v):9.3f} {1000 * statistics.median(v) / n:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48, help="images per set")
    ap.add_argument("--compressed", type=float, default=0.35, help="fraction compressed in the mixed set")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512])
    ap.add_argument("--repeat", type=int, default=3, help="runs per method and file in part 1; the fastest counts")
    ap.add_argument("--work", type=Path, default=Path("runs/bench_prepare"))
    ap.add_argument("--only", choices=["uncompressed", "mixed"], default=None)
    ap.add_argument("--resume-only", action="store_true", help="only part 3 (resume check), on the uncompressed set")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.resume_only:
        resume_check(make_data(args.work, args.images, 0.0), args.work, args.sizes, args.repeat)
        return
    for compressed, label, repeat in [(0.0, "uncompressed", args.repeat), (args.compressed, "mixed", 1)]:
        if args.only in (None, label):
            data = make_data(args.work, args.images, compressed)
            bench(data, args.work, args.sizes, repeat, label)
            if label == "uncompressed":
                resume_check(data, args.work, args.sizes, args.repeat)


if __name__ == "__main__":
    main()

"""How far apart are a prepared image and its copy, and how far apart are distinct images (the dedup threshold).

    python benchmarks/bench_dedup.py                 # ~1 minute on 2 CPU cores
    python benchmarks/bench_dedup.py --studies 200 --distance 10

A synthetic SIIM set is prepared at --size px. Each prepared train image gets copies as an external set would hold
it: resized (prepared from another resolution: down to 0.4-0.7x and back), re-windowed (gamma 0.6 and 1.6, a
2-98 percentile contrast stretch), re-encoded (JPEG quality 60), a few pixels of border cropped, and all of them at
once. Printed: the Hamming distances (64-bit perceptual hash, siimcovid.data.dedup) of each kind of copy to its
original, of every pair of distinct images, and the precision / recall of `distance <= --distance` on them.
Distinct pairs include a study's second image (synth's multi-image studies: another picture of the patient, not a
copy). The work folder (--work, default /tmp/siimcovid_bench_dedup) is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from siimcovid.config import load_config  # noqa: E402
from siimcovid.data import dedup  # noqa: E402
from siimcovid.data.prepare import prepare  # noqa: E402
from siimcovid.data.prepared import Prepared  # noqa: E402
from siimcovid.data.synth import generate  # noqa: E402


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape
    small = cv2.resize(image, (max(8, int(w * scale)), max(8, int(h * scale))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def gamma(image: np.ndarray, g: float) -> np.ndarray:
    return np.clip(255.0 * (image / 255.0) ** g, 0, 255).astype(np.uint8)


def stretched(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [2, 98])
    return np.clip((image.astype(float) - lo) * 255.0 / max(hi - lo, 1.0), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 60) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def cropped(image: np.ndarray, fraction: float = 0.03) -> np.ndarray:
    h, w = image.shape
    dy, dx = int(h * fraction), int(w * fraction)
    return cv2.resize(image[dy : h - dy, dx : w - dx], (w, h), interpolation=cv2.INTER_AREA)


COPIES = {
    "resize 0.4x": lambda im, rng: resized(im, 0.4),
    "resize 0.7x": lambda im, rng: resized(im, 0.7),
    "gamma 0.6": lambda im, rng: gamma(im, 0.6),
    "gamma 1.6": lambda im, rng: gamma(im, 1.6),
    "contrast 2-98%": lambda im, rng: stretched(im),
    "jpeg q60": lambda im, rng: jpeg(im),
    "crop 3%": lambda im, rng: cropped(im),
    "all of them": lambda im, rng: jpeg(cropped(stretched(gamma(resized(im, rng.uniform(0.4, 0.7)), rng.uniform(0.6, 1.6))))),
}


NOT_CHOSEN_FOR = ("crop 3%",)  # reported, not in the recall: the threshold is for resize, re-windowing and re-encoding


def hash_array(image: np.ndarray, path: Path) -> int:
    cv2.imwrite(str(path), image)
    return dedup.image_hash(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=120)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--distance", type=int, default=dedup.DEFAULT_DISTANCE)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/siimcovid_bench_dedup")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    try:
        root = generate(load_config("synth", {"out": str(work / "siim"), "train_studies": args.studies, "test_studies": 0,
                                              "rows": 640, "cols": 760, "seed": args.seed, "workers": 2}))  # fmt: skip
        settings = {"data": str(root), "out": str(work / "prep"), "sizes": [args.size], "n_folds": 2, "workers": 2}
        prep = Prepared(prepare(load_config("prepare", settings | {"data_yaml_dir": str(work / "data_yaml")})))
        ids, originals = dedup.hash_split(prep, "train", args.size)
        rng = np.random.default_rng(args.seed)
        copy_d = {name: [] for name in COPIES}
        for image_id, original in zip(ids, originals):
            image = cv2.imread(str(prep.image_path(image_id, "train", args.size)), cv2.IMREAD_GRAYSCALE)
            for name, make in COPIES.items():
                h = hash_array(make(image, rng), work / "copy.png")
                copy_d[name].append(int(dedup.distances([h], [original])[0, 0]))
        pairs = dedup.distances(originals, originals)[np.triu_indices(len(originals), k=1)]
        print(f"{len(ids)} prepared images at {args.size} px, {len(pairs)} distinct pairs; Hamming distance of 64 bits")
        print(f"{'':16s} {'min':>4s} {'median':>6s} {'max':>4s}  within {args.distance}")
        for name, d in copy_d.items():
            d = np.array(d)
            print(f"{name:16s} {d.min():4d} {np.median(d):6.1f} {d.max():4d}  {np.mean(d <= args.distance):6.1%}")
        share = np.mean(pairs <= args.distance)
        print(f"{'distinct pairs':16s} {pairs.min():4d} {np.median(pairs):6.1f} {pairs.max():4d}  {share:6.2%}")
        copies = np.concatenate([np.array(d) for name, d in copy_d.items() if name not in NOT_CHOSEN_FOR])
        tp, fn = int((copies <= args.distance).sum()), int((copies > args.distance).sum())
        fp = int((pairs <= args.distance).sum())
        print(f"at distance <= {args.distance}: recall {tp / (tp + fn):.3f} ({tp}/{tp + fn} copies), "
              f"false matches {fp} of {len(pairs)} distinct pairs, precision {tp / max(tp + fp, 1):.3f}")  # fmt: skip
        for t in range(0, 25, 2):
            print(f"  threshold {t:2d}: recall {np.mean(copies <= t):.3f}, false matches {int((pairs <= t).sum())}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""External images that are SIIM's own: a perceptual hash of prepared images and the pool images it matches.

The SIIM images were drawn from public sets (BIMCV, RICORD): an external pool can hold SIIM train or test
images under other ids (the 1st place removed them before pseudo-labelling). Their ids differ and their
bytes differ (another resize, window and encoding), so the check compares pixels: the 64-bit DCT perceptual
hash (imagehash.phash) of the grayscale prepared image, and the Hamming distance between hashes. A pool image
within `max_distance` bits of a SIIM image is a copy. benchmarks/bench_dedup.py measures the default
(DEFAULT_DISTANCE) on synthetic copies (resized, re-windowed, JPEG re-encoded) and on distinct images.

    image_hash(path) -> int                       one image's hash
    hash_images(paths, desc) -> np.ndarray        many (uint64), with progress
    hash_split(prep, split, size) -> (ids, hashes) a prepared folder's split
    distances(a, b) -> np.ndarray                 every pairwise Hamming distance (pure, vectorised)
    find_copies(pool, siim, max_distance)         per pool image, its nearest SIIM image when within max_distance
    siim_hashes(data, size) -> (ids, splits, hashes)  every SIIM train and test image's, once for several pools
    siim_copies(source, data, size, max_distance, pool_split) the tables.COPIES rows of a pool against SIIM train and test
    check_pool(copies, where, ...)  dedup=refuse's error; the log line of what dedup=drop left out
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from siimcovid.utils import SiimError

DEFAULT_DISTANCE = 8  # bits of 64: benchmarks/bench_dedup.py: 99% of resized, re-windowed, re-encoded copies are within 8
MODES = ("drop", "keep", "refuse")
CHUNK = 1024  # pool rows per block of the distance matrix (1024 x 10,000 uint64: 80 MB)


def image_hash(path: str | os.PathLike) -> int:
    """The 64-bit perceptual hash (imagehash.phash, 8 x 8 DCT signs) of an image read as grayscale and histogram
    equalised first: a re-windowing (any increasing grey-level map: gamma, contrast) then barely changes it."""
    import cv2
    import imagehash
    from PIL import Image

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SiimError(f"dedup: {path} is not a readable image")
    bits = imagehash.phash(Image.fromarray(cv2.equalizeHist(image))).hash.flatten()
    return int(np.packbits(bits).view(">u8")[0])


def hash_images(paths, desc: str = "hash") -> np.ndarray:
    """The hashes of many images (uint64, in order), with a progress bar for long lists."""
    from tqdm import tqdm

    paths = list(paths)
    return np.array([image_hash(p) for p in tqdm(paths, desc=desc, unit="img", disable=len(paths) < 200)], dtype=np.uint64)


def hash_split(prep, split: str, size: int) -> tuple[list[str], np.ndarray]:
    """(image ids, hashes) of a prepared folder's split at one prepared size."""
    ids = prep.split(split).image_id.tolist()
    return ids, hash_images([prep.image_path(i, split, size) for i in ids], desc=f"hash {prep.name} {split}")


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between every hash of `a` (rows) and of `b` (columns): int matrix len(a) x len(b)."""
    a, b = np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)
    return np.bitwise_count(a[:, None] ^ b[None, :]).astype(np.int64)


def find_copies(pool: np.ndarray, siim: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pool index, nearest siim index, distance) of every pool hash within max_distance bits of a siim hash."""
    pool = np.asarray(pool, dtype=np.uint64)
    if len(pool) == 0 or len(siim) == 0:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, int)
    nearest, best = np.empty(len(pool), int), np.empty(len(pool), int)
    for start in range(0, len(pool), CHUNK):
        block = distances(pool[start : start + CHUNK], siim)
        nearest[start : start + CHUNK] = block.argmin(axis=1)
        best[start : start + CHUNK] = block.min(axis=1)
    found = np.flatnonzero(best <= max_distance)
    return found, nearest[found], best[found]


def siim_hashes(data, size: int) -> tuple[list[str], list[str], np.ndarray]:
    """(image ids, their splits, hashes) of every train and test image of the SIIM prepared folder `data` at `size`:
    what pools are compared with (hashed once for several pools: siim_copies' siim=)."""
    ids, splits, hashes = [], [], []
    for split in ("train", "test"):
        found, values = hash_split(data, split, size)
        ids += found
        splits += [split] * len(found)
        hashes.append(values)
    return ids, splits, np.concatenate(hashes)


def siim_copies(source, data, size: int, max_distance: int, pool_split: str = "test", siim=None) -> pd.DataFrame:
    """The tables.COPIES rows: the `pool_split` images of `source` (a pool's: test; an external labelled set's: train)
    whose pixels match a train or test image of the SIIM prepared folder `data` (both Prepared, hashed at the prepared
    `size` both have). siim: siim_hashes(data, size) when the caller has them already."""
    from siimcovid.tables import COPIES

    if size not in source.sizes or size not in data.sizes:
        raise SiimError(f"dedup: {source.root} (sizes {source.sizes}) and {data.root} (sizes {data.sizes}) lack size {size}")
    pool_ids, pool = hash_split(source, pool_split, size)
    siim_ids, siim_splits, hashes = siim if siim is not None else siim_hashes(data, size)
    i, j, d = find_copies(pool, hashes, max_distance)
    rows = pd.DataFrame(
        {
            "image_id": np.array(pool_ids, dtype=object)[i],
            "siim_image_id": np.array(siim_ids, dtype=object)[j],
            "siim_split": np.array(siim_splits, dtype=object)[j],
            "distance": d,
        }
    )
    return COPIES.check(rows) if len(rows) else COPIES.empty()


def check_pool(copies: pd.DataFrame, where: str, noun: str, n: int, mode: str, max_distance: int, listed) -> None:
    """dedup=refuse: an error naming the first copies; otherwise the log line of what dedup=drop leaves out (of n).
    where: the folder checked; noun: what its images are ("pool images", "extra images"); listed: the copies CSV."""
    from siimcovid.utils import LOGGER

    pairs = ", ".join(f"{r.image_id} = {r.siim_split} {r.siim_image_id} ({r.distance} bits)" for r in copies.head(3).itertuples())
    if mode == "refuse" and len(copies):
        raise SiimError(
            f"{where}: {len(copies)} {noun} are SIIM images under other ids (perceptual hash within "
            f"dedup_distance={max_distance} bits), e.g. {pairs}; dedup=drop leaves them out"
        )
    if len(copies):
        LOGGER.warning(f"dedup: left out {len(copies)} of {n} {noun} of {where}, SIIM's own ({listed}), e.g. {pairs}")
    else:
        LOGGER.info(f"dedup: none of the {n} {noun} of {where} is a SIIM image's copy (dedup_distance={max_distance}; {listed})")

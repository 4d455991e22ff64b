"""Pool images that are SIIM's own under other ids: the perceptual hash survives a copy's resize, re-windowing and
re-encoding, a distinct image is not matched, and pseudo's dedup=drop | refuse | keep."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from siimcovid import pseudo
from siimcovid.config import load_config
from siimcovid.data import dedup
from siimcovid.data.prepared import Prepared
from siimcovid.tables import COPIES
from siimcovid.utils import SiimError


def as_a_copy(image: np.ndarray) -> np.ndarray:
    """What an external set's copy of an image went through: another resolution, another window, JPEG."""
    h, w = image.shape
    small = cv2.resize(image, (w * 11 // 20, h * 11 // 20), interpolation=cv2.INTER_AREA)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    image = np.clip(255.0 * (image / 255.0) ** 1.4, 0, 255).astype(np.uint8)
    return cv2.imdecode(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 60])[1], cv2.IMREAD_GRAYSCALE)


def distinct(size: int) -> np.ndarray:
    """An image that is no chest radiograph of the set: bright blobs on a dark ground, of its own seed."""
    rng = np.random.default_rng(123)
    image = np.zeros((size, size), np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size, 2)
        cv2.circle(image, (int(x), int(y)), int(rng.integers(size // 10, size // 4)), int(rng.integers(120, 255)), -1)
    return cv2.GaussianBlur(image, (0, 0), 2)


def test_hamming_distances_and_the_nearest_match_within_the_threshold():
    siim = np.array([0, 0xFF, 2**64 - 1], dtype=np.uint64)
    pool = np.array([0b1011, 2**63, 0xFFFFFFFF], dtype=np.uint64)
    assert dedup.distances(pool, siim).tolist() == [[3, 5, 61], [1, 9, 63], [32, 24, 32]]
    i, j, d = dedup.find_copies(pool, siim, max_distance=3)
    assert i.tolist() == [0, 1] and j.tolist() == [0, 0] and d.tolist() == [3, 1]
    assert len(dedup.find_copies(pool, siim, 0)[0]) == 0 and len(dedup.find_copies(pool[:0], siim, 64)[0]) == 0


def test_a_copy_is_within_the_threshold_and_a_distinct_image_is_not(prepared, tmp_path):
    prep = Prepared(prepared)
    ids, hashes = dedup.hash_split(prep, "train", 128)
    original = cv2.imread(str(prep.image_path(ids[5], "train", 128)), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "copy.png"), cv2.resize(as_a_copy(original), (64, 64), interpolation=cv2.INTER_AREA))
    cv2.imwrite(str(tmp_path / "other.png"), distinct(128))
    pool = dedup.hash_images([tmp_path / "copy.png", tmp_path / "other.png"])
    i, j, d = dedup.find_copies(pool, hashes, dedup.DEFAULT_DISTANCE)
    assert i.tolist() == [0] and hashes[j[0]] == hashes[5] and d[0] <= dedup.DEFAULT_DISTANCE
    assert dedup.distances(pool[1:], hashes).min() > dedup.DEFAULT_DISTANCE


@pytest.fixture
def pool(prepared, tmp_path) -> Path:
    """A prepared pool (another folder) whose test image 0 is a re-encoded copy of SIIM train image 5 under its own id,
    and whose test image 1 is a distinct image."""
    root = Path(shutil.copytree(prepared, tmp_path / "pool", ignore=shutil.ignore_patterns("128")))
    source, data = Prepared(root), Prepared(prepared)
    test = source.split("test").image_id.tolist()
    train = data.split("train").image_id.tolist()
    original = cv2.imread(str(data.image_path(train[5], "train", 64)), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(source.image_path(test[0], "test", 64)), as_a_copy(original))
    cv2.imwrite(str(source.image_path(test[1], "test", 64)), distinct(64))
    return root


def dedup_run(prepared, pool, out, mode):
    cfg = load_config("pseudo", {"teacher_det": "x", "teacher_cls": "y", "dedup": mode, "out": str(out)})
    source, data = Prepared(pool), Prepared(prepared)
    written = pseudo.open_folder(cfg, out, [source.root, data.root])
    return pseudo.without_copies(cfg, source, data, source.split("test"), [64], written), source, data


def test_drop_leaves_the_copy_out_and_lists_it(prepared, pool, tmp_path):
    kept, source, data = dedup_run(prepared, pool, tmp_path / "out", "drop")
    test, train = source.split("test").image_id.tolist(), data.split("train").image_id.tolist()
    copies = COPIES.read(tmp_path / "out" / "copies.csv")
    hidden = copies.set_index("image_id").loc[test[0]]
    assert hidden.siim_image_id == train[5] and hidden.siim_split == "train"
    assert test[0] not in set(kept.image_id) and test[1] in set(kept.image_id) and test[1] not in set(copies.image_id)
    # the pool's other test images are SIIM's test images byte for byte: found too, under their own SIIM ids
    rest = copies[copies.image_id != test[0]]
    assert set(rest.image_id) == set(test[2:]) and (rest.siim_split == "test").all() and (rest.distance == 0).all()
    assert len(kept) == 1


def test_refuse_names_the_pair_and_keep_leaves_the_pool_as_it_is(prepared, pool, tmp_path):
    with pytest.raises(SiimError, match=r"pool images are SIIM images .* dedup_distance=8") as refused:
        dedup_run(prepared, pool, tmp_path / "refused", "refuse")
    hidden, original = Prepared(pool).split("test").image_id.iloc[0], Prepared(prepared).split("train").image_id.iloc[5]
    assert f"{hidden} = train {original}" in str(refused.value)  # the first pair, named
    assert not (tmp_path / "refused" / "copies.csv").exists()
    kept, source, _ = dedup_run(prepared, pool, tmp_path / "kept", "keep")
    assert kept.image_id.tolist() == source.split("test").image_id.tolist()
    assert not (tmp_path / "kept" / "copies.csv").exists()


def as_external(prepared, out: Path) -> Path:
    """A copy of the SIIM prepared folder (its 64 px images) that says it is an external set of layout rsna."""
    import yaml

    root = Path(shutil.copytree(prepared, out, ignore=shutil.ignore_patterns("128")))
    saved = yaml.safe_load((root / "prepare.yaml").read_text())
    section = next(k for k, v in saved.items() if k != "learned" and isinstance(v, dict))
    saved[section] = {**saved[section], "layout": "rsna", "sizes": [64]}
    (root / "prepare.yaml").write_text(yaml.safe_dump(saved))
    return root


@pytest.fixture
def external(prepared, tmp_path) -> Path:
    """An external labelled set (layout rsna) whose train images are the SIIM train images, but image 0 is a re-encoded
    copy of SIIM train image 5 (under image 0's id) and image 1 a distinct image."""
    root = as_external(prepared, tmp_path / "ext")
    source, data = Prepared(root), Prepared(prepared)
    train = data.split("train").image_id.tolist()
    original = cv2.imread(str(data.image_path(train[5], "train", 64)), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(source.image_path(train[0], "train", 64)), as_a_copy(original))
    cv2.imwrite(str(source.image_path(train[1], "train", 64)), distinct(64))
    return root


def test_extra_drops_an_external_sets_siim_copies_from_every_fold_and_lists_them(prepared, external, tmp_path):
    from siimcovid.data.extra import open_extra

    data = Prepared(prepared)
    train = data.split("train").image_id.tolist()
    (e,) = open_extra([external], data.folds_id, data.n_folds, (data, 64, "drop", 8, tmp_path))
    copies = COPIES.read(tmp_path / "copies_ext.csv")
    assert copies.set_index("image_id").loc[train[0]].siim_image_id == train[5]  # the hidden copy, under its own id
    assert train[1] not in set(copies.image_id) and set(copies.image_id) == set(train) - {train[1]}  # the rest: byte copies
    for fold in range(data.n_folds):
        assert [Path(p).stem for p in e.detector_images(fold, 64)] == [train[1]]
        assert [Path(p).stem for p in e.classifier_rows(fold, 64).image] == [train[1]]
    (kept,) = open_extra([external], data.folds_id, data.n_folds, (data, 64, "keep", 8, tmp_path / "kept"))
    assert len(kept.classifier_rows(0, 64)) == len(train) and not (tmp_path / "kept").exists()
    with pytest.raises(SiimError, match=rf"ext: {len(train) - 1} extra images are SIIM images under other ids"):
        open_extra([external], data.folds_id, data.n_folds, (data, 64, "refuse", 8, tmp_path / "refused"))


def test_an_external_set_that_is_all_copies_says_so_and_names_dedup_keep(prepared, tmp_path):
    from siimcovid.data.extra import open_extra

    root = as_external(prepared, tmp_path / "same")
    data = Prepared(prepared)
    (e,) = open_extra([root], data.folds_id, data.n_folds, (data, 64, "drop", 8, tmp_path))
    with pytest.raises(SiimError, match="all of its .* images are SIIM images' copies .*dedup=keep"):
        e.classifier_rows(0, 64)

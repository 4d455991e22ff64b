"""Where the prepared files live (see siimcovid/data/prepared.py for the whole layout).

Kept free of heavy imports: the decode workers import it.
"""

from __future__ import annotations

from pathlib import Path


def image_file(root: Path, size: int, split: str, image_id: str, ext: str) -> Path:
    return Path(root) / str(size) / "images" / split / f"{image_id}.{ext}"


def label_file(root: Path, size: int, image_id: str) -> Path:
    return Path(root) / str(size) / "labels" / "train" / f"{image_id}.txt"


def mask_file(root: Path, size: int, image_id: str) -> Path:
    return Path(root) / str(size) / "masks" / "train" / f"{image_id}.png"

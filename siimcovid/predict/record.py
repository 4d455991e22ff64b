"""<out>/predict.yaml: what made the tables in an output folder, so that a re-run reuses only its own.

    bundle, bundle_sha256   the bundle and the sha256 of its manifest.yaml (which holds every file's sha256)
    settings                predict's resolved settings
    members                 {"detect/<name>" | "classify/<name>": {images, tta, half, precision, backend}}, added as
                            each member's table is written: a table is reused only when its entry matches what would
                            make it now (same bundle, the same prepared test images, TTA, precision and backend; an int8
                            engine: backend openvino, precision int8) and the file is there
    views                   crop=lung: {"<kind>/<name>": {lung: the lung member it cropped with, cropped: {fold: how
                            many of the images that fold saw cropped to a confident lung box (the rest: whole only)}}}
    n_images, seconds       the images predicted and the time of each step of the last run
    files                   every file predict wrote in the folder (siimcovid.outputs.Written): only these are ever
                            replaced or removed (a user's photo in pictures/ stays)

The record is known by its first line (siimcovid.outputs.is_record): a predict.yaml of the user's (Ultralytics writes
files of that name) is never taken for it. One the release before the outputs rule wrote (bundle_sha256, settings
and members, no first line, no files) is adopted: siimcovid.predict.stage.earlier_outputs.

Another bundle in the same folder: its members' tables (and the fused ones) are removed, not mixed in; a file
of the user's in those folders stays.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from siimcovid.outputs import Written
from siimcovid.utils import LOGGER

RECORD = "predict.yaml"
MEMBER_DIRS = ("detect", "classify", "lung")  # where a bundle's members' tables are (lung: its lung detectors')
FUSE_DIR = "fuse"  # predict's fusion: `siimcovid fuse` writes <out>/fuse, with a record of its own


def images_id(image_ids) -> str:
    """A fingerprint of the ordered test images a table was predicted on."""
    return hashlib.sha1("\n".join(map(str, image_ids)).encode()).hexdigest()[:16]


class Record(Written):
    """The output folder's predict.yaml, kept in memory and written after every change."""

    def __init__(self, out: Path, bundle: str, bundle_sha256: str, settings: dict):
        super().__init__(out, RECORD, "predict")
        old, members = self.data, self.data.get("members") or {}
        if old and old.get("bundle_sha256") != bundle_sha256:
            self.clear_results(old.get("bundle"))
            members = {}
        self.data = {"bundle": str(bundle), "bundle_sha256": bundle_sha256, "settings": settings, "members": members}
        self.data["seconds"] = {}  # (and `views`, of this run's members of crop=lung, as each is predicted)

    def clear_results(self, old_bundle) -> None:
        """Remove the tables another bundle made here (the prepared images stay: same source, same conversion or not):
        only those the records list, predict's and its fusion's."""
        from siimcovid.fuse.stage import RECORD as FUSE_RECORD
        from siimcovid.fuse.stage import earlier_fuse

        removed = [f for d in MEMBER_DIRS for f in self.remove_all(d)]
        fused = Written(self.folder / FUSE_DIR, FUSE_RECORD, "fuse", earlier_fuse)
        removed += [f"{FUSE_DIR}/{f}" for f in fused.remove_all()]
        LOGGER.warning(f"predict: {self.folder} held predictions of another bundle ({old_bundle}): removed {len(removed)} files")

    def reusable(self, key: str, entry: dict, table: Path) -> bool:
        """Whether the table of member `key` was made by this bundle as it would be made now."""
        return table.is_file() and self.data["members"].get(key) == entry

    def forget(self, key: str) -> None:
        """Before a member's table is (re)written: until it is done, the record does not vouch for it."""
        if self.data["members"].pop(key, None) is not None:
            self.save()

    def done(self, key: str, entry: dict) -> None:
        self.data["members"][key] = entry
        self.save()

    def views(self, key: str, lung: str, cropped: dict[int, int]) -> None:
        """A member of crop=lung: the lung member it crops with and how many images each fold saw cropped."""
        self.data.setdefault("views", {})[key] = {"lung": lung, "cropped": dict(cropped)}
        self.save()

    def timed(self, step: str, seconds: float) -> None:
        self.data["seconds"][step] = round(seconds, 3)
        self.save()

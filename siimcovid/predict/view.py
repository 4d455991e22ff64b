"""What `siimcovid predict` leaves for people: three tables, one drawn picture per image, one HTML page.

    write_view(prepared, fused, out) reads fuse's test tables in `fused` (images_test.csv, studies_test.csv,
    boxes_test.csv: tables.FUSED_*) and the prepared folder's meta (original size, source file), and writes:

    <out>/studies.csv        tables.PREDICTED_STUDIES: per study, the four class probabilities
    <out>/images.csv         tables.PREDICTED_IMAGES: per image, its source file, original size, P(none), boxes
    <out>/boxes.csv          tables.PREDICTED_BOXES: every fused box, ORIGINAL pixels, most confident first
    <out>/pictures/<image_id>.jpg   the prepared image at its largest size, back to the original aspect ratio,
                             with the confident boxes (conf >= min_conf, at most max_boxes) and their confidences
    <out>/skipped.csv        tables.SKIPPED: the input files that were not readable images (when any)
    <out>/index.html         one page, no outside resource: the studies (most likely abnormal first), their
                             probabilities (the most probable highlighted), their images as thumbnails linking to
                             the pictures; written last

boxes.csv keeps every box (the submission's low-confidence boxes included: they count for the metric); the
pictures show only the confident ones, and the page says which. Every file is claimed in predict's record first
(predict.yaml, siimcovid.outputs.Written): a file of the user's is never overwritten, and a re-run removes only the
pictures the record says predict drew.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from siimcovid.data.dicom import TAGS_CHECKED
from siimcovid.data.prepared import Prepared
from siimcovid.outputs import Written
from siimcovid.predict.record import RECORD
from siimcovid.tables import (
    BOX_COLUMNS,
    FUSED_BOXES,
    FUSED_IMAGES,
    FUSED_STUDIES,
    PREDICTED_BOXES,
    PREDICTED_IMAGES,
    PREDICTED_STUDIES,
    SKIPPED,
    STUDY_CLASSES,
    TAG_MISSING,
)
from siimcovid.utils import SiimError, atomic_path, atomic_write_text

MIN_CONF = 0.3  # boxes drawn: fused confidence at least this...
MAX_BOXES = 8  # ...and at most this many per image, the most confident
BOX_BGR, TEXT_BGR = (0, 0, 255), (255, 255, 255)  # red boxes; white text on a red label
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
PICTURES = "pictures"
PAGE_FILES = ("studies.csv", "images.csv", "boxes.csv", "index.html")  # besides the pictures and skipped.csv


def read_fused(fused: Path, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """fuse's images, studies and boxes tables of a split."""
    fused = Path(fused)
    paths = [fused / f"{t}_{split}.csv" for t in ("images", "studies", "boxes")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SiimError(f"{fused} lacks fuse's tables {missing}: run `siimcovid fuse split={split}` first")
    return FUSED_IMAGES.read(paths[0]), FUSED_STUDIES.read(paths[1]), FUSED_BOXES.read(paths[2])


def source_files(prepared: Prepared, meta: pd.DataFrame) -> list[str]:
    """The input file of each meta row: prepare's data root joined with the row's relative path."""
    root = Path(prepared.cfg.get("data_resolved") or prepared.cfg.get("data") or ".")
    return [os.path.normpath(root / rel) for rel in meta.dicom]


def build_tables(prepared: Prepared, images, studies, boxes) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """fuse's tables + the prepared meta -> the PREDICTED_* tables (studies most likely abnormal first)."""
    meta = prepared.meta.set_index("image_id")
    unknown = sorted(set(images.image_id) - set(meta.index))
    if unknown:
        raise SiimError(f"{len(unknown)} fused image(s) are not in {prepared.root}/meta.csv, e.g. {unknown[0]}")
    rows = meta.loc[images.image_id].reset_index()
    boxes = boxes[boxes.image_id.isin(images.image_id)].sort_values(["image_id", "conf"], ascending=[True, False])
    out_images = pd.DataFrame(
        {
            "image_id": images.image_id.to_numpy(),
            "study_id": rows.study_id.to_numpy(),
            "file": source_files(prepared, rows),
            "rows": rows.rows.to_numpy(),
            "cols": rows.cols.to_numpy(),
            **{c: rows[c].replace("", TAG_MISSING).to_numpy() for c in TAGS_CHECKED if c in rows},  # say so, never guess
            "none": images["none"].to_numpy(),
            "n_boxes": images.image_id.map(boxes.image_id.value_counts()).fillna(0).astype(int).to_numpy(),
            "picture": [f"{PICTURES}/{i}.jpg" for i in images.image_id],
        }
    )
    out_studies = studies[["study_id", *STUDY_CLASSES]].copy()
    out_studies["predicted"] = out_studies[STUDY_CLASSES].idxmax(axis=1)
    out_studies["n_images"] = out_studies.study_id.map(out_images.study_id.value_counts()).fillna(0).astype(int)
    out_studies = out_studies.sort_values(["negative", "study_id"], kind="stable").reset_index(drop=True)
    return out_studies, out_images, boxes[["image_id", *BOX_COLUMNS, "conf"]].reset_index(drop=True)


def picture_shape(rows: int, cols: int, side: int) -> tuple[int, int]:
    """(height, width) of a picture whose longer side is `side`, in the original's aspect ratio."""
    scale = side / max(rows, cols)
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def draw_picture(square: np.ndarray, rows: int, cols: int, boxes: pd.DataFrame) -> np.ndarray:
    """The prepared (square, grey) image back to the original aspect ratio, with `boxes` (original pixels) and
    their confidences drawn in red."""
    h, w = picture_shape(rows, cols, square.shape[0])
    picture = cv2.cvtColor(cv2.resize(square, (w, h), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    return draw_boxes(picture, boxes, w / cols, h / rows)


def draw_boxes(picture: np.ndarray, boxes: pd.DataFrame, sx: float = 1.0, sy: float = 1.0) -> np.ndarray:
    """`boxes` (original pixels, scaled by sx, sy) and their confidences drawn in red on the BGR `picture`, in place
    (OpenCV's built-in Hershey font: nothing to download)."""
    h, w = picture.shape[:2]
    thick = max(2, round(max(h, w) / 300))
    font_scale = max(0.45, max(h, w) / 1000)
    for b in boxes.itertuples(index=False):
        x1, y1, x2, y2 = round(b.x_min * sx), round(b.y_min * sy), round(b.x_max * sx), round(b.y_max * sy)
        cv2.rectangle(picture, (x1, y1), (x2, y2), BOX_BGR, thick)
        label = f"{b.conf:.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        top = y1 - th - base - thick if y1 - th - base - thick >= 0 else y1 + thick  # above the box, else inside
        cv2.rectangle(picture, (x1, top), (x1 + tw + 2, top + th + base), BOX_BGR, -1)
        cv2.putText(picture, label, (x1 + 1, top + th), cv2.FONT_HERSHEY_SIMPLEX, font_scale, TEXT_BGR, 1, cv2.LINE_AA)
    return picture


def shown_boxes(boxes: pd.DataFrame, min_conf: float, max_boxes: int) -> pd.DataFrame:
    """The boxes a picture shows: conf >= min_conf, the max_boxes most confident of each image."""
    kept = boxes[boxes.conf >= min_conf].sort_values("conf", ascending=False, kind="stable")
    return kept.groupby("image_id", sort=False).head(max_boxes)


def write_pictures(prepared: Prepared, images: pd.DataFrame, shown: pd.DataFrame, out: Path, record: Written) -> None:
    """<out>/pictures/<image_id>.jpg for every image, from its prepared image at the largest size."""
    drawn = [out / p for p in images.picture]
    record.claim(*drawn)
    size, by_image = max(prepared.sizes), dict(tuple(shown.groupby("image_id")))
    split = prepared.meta.set_index("image_id").split
    for row in tqdm(images.itertuples(index=False), total=len(images), desc="pictures", unit="img"):
        path = prepared.image_path(row.image_id, split[row.image_id], size)
        square = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if square is None:
            raise SiimError(f"cannot read the prepared image {path}: run `siimcovid prepare` again")
        picture = draw_picture(square, row.rows, row.cols, by_image.get(row.image_id, shown.iloc[:0]))
        ok, data = cv2.imencode(".jpg", picture, JPEG_PARAMS)
        if not ok:
            raise SiimError(f"could not encode the picture of {row.image_id}")
        with atomic_path(out / row.picture) as tmp:
            tmp.write_bytes(data.tobytes())
    stale = set(record.files) - {record.relative(p) for p in drawn}  # of images an earlier run predicted, not this one
    record.remove(*(out / p for p in sorted(stale) if p.startswith(f"{PICTURES}/")))


PAGE_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}
table.p{border-collapse:collapse;margin:.3em 0}table.p td,table.p th{border:1px solid #bbb;padding:.2em .6em;text-align:right}
td.top{background:#ffd54f;font-weight:bold}section{border-top:1px solid #ccc;padding:.6em 0}
figure{display:inline-block;margin:.3em;vertical-align:top;font-size:.85em}figure img{width:200px;border:1px solid #888}
code{font-size:.85em}"""


def study_html(study, images: pd.DataFrame) -> str:
    """One study: its four probabilities (the most probable highlighted) and its images' thumbnails."""
    e = html.escape
    head = "".join(f"<th>{c}</th>" for c in STUDY_CLASSES)
    cells = "".join(
        f'<td class="top">{getattr(study, c):.3f}</td>' if c == study.predicted else f"<td>{getattr(study, c):.3f}</td>"
        for c in STUDY_CLASSES
    )
    figures = "".join(
        f'<figure><a href="{e(im.picture)}"><img src="{e(im.picture)}" loading="lazy" alt="{e(im.image_id)}"></a>'
        f"<figcaption><code>{e(im.image_id)}</code><br>P(none) {im.none:.3f}, {im.n_boxes} box(es), {im.n_shown} drawn"
        f'<br><small title="{e(im.file)}">{e(Path(im.file).name)}</small></figcaption></figure>'
        for im in images.itertuples(index=False)
    )
    return (
        f"<section><h3>Study <code>{e(study.study_id)}</code>: {e(study.predicted)}</h3>"
        f'<table class="p"><tr>{head}</tr><tr>{cells}</tr></table>{figures}</section>\n'
    )


def page_html(studies, images, skipped, min_conf: float, max_boxes: int) -> str:
    """The whole index.html: a self-contained page (inline style, relative links to the pictures)."""
    e = html.escape
    by_study = dict(tuple(images.groupby("study_id", sort=False)))
    body = "".join(study_html(s, by_study.get(s.study_id, images.iloc[:0])) for s in studies.itertuples(index=False))
    skipped_html = ""
    if len(skipped):
        items = "".join(f"<li><code>{e(str(r.file))}</code>: {e(str(r.problem))}</li>" for r in skipped.itertuples())
        skipped_html = f"<h2>Skipped inputs ({len(skipped)}, see skipped.csv)</h2><ul>{items}</ul>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>siimcovid predict</title>'
        f"<style>{PAGE_STYLE}</style></head><body>\n<h1>siimcovid predict: {len(studies)} studies, {len(images)} images</h1>\n"
        f"<p>Studies most likely abnormal first (lowest P(negative)); the most probable class is highlighted. "
        f"Pictures show the boxes of confidence &ge; {min_conf:g}, at most {max_boxes} per image; "
        f'<a href="boxes.csv">boxes.csv</a> lists them all in original pixels. Tables: <a href="studies.csv">studies.csv</a>, '
        f'<a href="images.csv">images.csv</a>.</p>\n{skipped_html}{body}</body></html>\n'
    )


def write_view(
    prepared: Path, fused: Path, out: Path, min_conf: float = MIN_CONF, max_boxes: int = MAX_BOXES, record: Written | None = None
) -> dict[str, Path]:
    """The tables, pictures and page of a prediction (see the module docstring); index.html last. `record`:
    predict's (by default the one in `out`)."""
    data, out = Prepared(prepared), Path(out)
    record = Written(out, RECORD, "predict") if record is None else record
    studies, images, boxes = build_tables(data, *read_fused(Path(fused)))
    shown = shown_boxes(boxes, min_conf, max_boxes)
    images["n_shown"] = images.image_id.map(shown.image_id.value_counts()).fillna(0).astype(int)
    skipped = data.skipped()
    names = [*PAGE_FILES, *(["skipped.csv"] if len(skipped) else [])]
    record.claim(*(out / name for name in names))
    write_pictures(data, images, shown, out, record)
    files = {
        "studies": PREDICTED_STUDIES.write(studies, out / "studies.csv"),
        "images": PREDICTED_IMAGES.write(images, out / "images.csv"),
        "boxes": PREDICTED_BOXES.write(boxes, out / "boxes.csv"),
        "pictures": out / PICTURES,
    }
    if len(skipped):
        files["skipped"] = SKIPPED.write(skipped, out / "skipped.csv")
    files["html"] = atomic_write_text(out / "index.html", page_html(studies, images, skipped, min_conf, max_boxes))
    return files

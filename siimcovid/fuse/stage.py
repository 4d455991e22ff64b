"""`siimcovid fuse`: fuse detection and classifier predictions of one split; score OOF, write the submission.

Outputs in <project>/<name>/ (CSVs written atomically by their contracts in siimcovid/tables.py,
which documents their columns):

    fuse_<split>.yaml     the resolved config (written last but one: it always matches the files beside it)
    fusion.yaml           the record of what was fused (siimcovid.fuse.record: its `oof` / `test` entry, written last:
                          the member order, the input files and their sha256, the data, the parameters); export reads it
    pred_<split>.csv      tables.PREDICTIONS: the fused predictions in the metric's tidy form
    images_<split>.csv    tables.FUSED_IMAGES: one row per image (none_cls, none_det, the none written)
    studies_<split>.csv   tables.FUSED_STUDIES: one row per study
    boxes_<split>.csv     tables.FUSED_BOXES: one row per fused box (conf written, WBF's conf before re-weighting)
  split=oof:
    scores_oof.csv        tables.SCORES: "all", then one row per fold (siimcovid.metrics.fold_scores)
    scores_oof.json       the "all" score (siimcovid.metrics.Score.to_dict) with the fold table
    oof_submission.csv    the same predictions as a submission (score it again with `siimcovid evaluate`)
  split=test:
    submission.csv        every id of sample_submission.csv, checked; written last
    fuse_files.yaml       the record of what fuse and `fuse tune` wrote in the folder (siimcovid.outputs): they
                          write into a new, empty or own folder (else overwrite=true, beside the other files), and
                          replace or remove only the files it lists; a folder the release before that rule wrote
                          (its config records, no fuse_files.yaml) is adopted (earlier_fuse)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from siimcovid.config import Config
from siimcovid.fuse.inputs import FuseInputs, load_inputs
from siimcovid.fuse.pipeline import Fused, describe_inputs, fold_scores, fuse_split, fusion_params, score_fused
from siimcovid.fuse.record import NAME as FUSION_RECORD
from siimcovid.fuse.record import forget, make_entry, remember
from siimcovid.outputs import Earlier, Written, open_out, present, read_mapping
from siimcovid.submission import pred_to_submission, write_submission
from siimcovid.tables import FUSED_BOXES, FUSED_IMAGES, FUSED_STUDIES, PREDICTIONS, SCORES
from siimcovid.utils import LOGGER, atomic_write_text

RECORD = "fuse_files.yaml"
SPLITS = ("oof", "test")
CONFIG_KEYS = {"det", "cls", "data", "split"}  # in every config record fuse and tune save (fuse_<split>.yaml, tune.yaml)
TUNE_OUTPUTS = ("tune.yaml", "trials.csv", "tune_compare.csv", "best.yaml", FUSION_RECORD)  # what `fuse tune` writes


def run_dir(cfg: Config) -> Path:
    return Path(cfg.project) / cfg.name


def open_run_dir(cfg: Config, files: Iterable[Path] = ()) -> Written:
    """<project>/<name>/ by the outputs rule (fuse's and tune's record, listing `files`, the files this run writes),
    checked before any input is read; the folder may not hold its inputs."""
    inputs = [*cfg.det, *cfg.cls, *(cfg.get("none_cls") or []), cfg.data, cfg.get("sample")]
    return open_out(run_dir(cfg), RECORD, "fuse", cfg.overwrite, inputs, "project/name", earlier=earlier_fuse, claim=files)


def earlier_fuse(folder: Path) -> Earlier | None:
    """A <project>/<name>/ the release before the outputs rule left (outputs.Earlier): no fuse_files.yaml, and a config
    record only fuse and tune save (fuse_<split>.yaml, tune.yaml: a mapping of fuse's settings). The files there named
    as fuse and tune name theirs become their own."""
    configs = [folder / f"fuse_{split}.yaml" for split in SPLITS] + [folder / "tune.yaml"]
    if os.path.lexists(folder / RECORD) or not any(CONFIG_KEYS <= set(read_mapping(p) or {}) for p in configs):
        return None
    names = [p.name for split in SPLITS for p in split_files(folder, split)] + list(TUNE_OUTPUTS)
    return Earlier(present(folder, names))


def split_files(out: Path, split: str) -> list[Path]:
    """Every file `fuse split=<split>` writes (module docstring)."""
    names = [f"{t}_{split}.csv" for t in ("pred", "images", "studies", "boxes")] + [f"fuse_{split}.yaml"]
    names += ["scores_oof.csv", "scores_oof.json", "oof_submission.csv"] if split == "oof" else ["submission.csv"]
    names.append(FUSION_RECORD)
    return [out / n for n in names]


def write_tables(out: Path, split: str, fused: Fused) -> dict[str, Path]:
    """The four fused tables of a split, each by its contract."""
    return {
        "pred": PREDICTIONS.write(fused.pred(), out / f"pred_{split}.csv"),
        "images": FUSED_IMAGES.write(fused.images, out / f"images_{split}.csv"),
        "studies": FUSED_STUDIES.write(fused.studies, out / f"studies_{split}.csv"),
        "boxes": FUSED_BOXES.write(fused.boxes, out / f"boxes_{split}.csv"),
    }


def write_oof_scores(out: Path, inputs: FuseInputs, fused: Fused, files: dict[str, Path]):
    """scores_oof.csv (per fold), scores_oof.json and oof_submission.csv; returns the overall Score."""
    table = fold_scores(inputs, fused)
    overall = score_fused(inputs, fused)
    files["scores"] = SCORES.write(table, out / "scores_oof.csv")
    report = {
        "n_images": len(fused.images),
        "n_studies": len(fused.studies),
        **overall.to_dict(),
        "folds": json.loads(table.to_json(orient="records")),
    }
    files["scores_json"] = atomic_write_text(out / "scores_oof.json", json.dumps(report, indent=2) + "\n")
    files["submission"] = write_submission(pred_to_submission(fused.pred(), fused.ids()), out / "oof_submission.csv")
    LOGGER.info(f"fuse: out-of-fold score of {len(fused.images)} images, {len(fused.studies)} studies\n{overall.format()}")
    if table["fold"].nunique() > 2:
        LOGGER.info("per fold:\n" + table.drop(columns=["image_map"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return overall


def write_test_submission(out: Path, inputs: FuseInputs, fused: Fused, files: dict[str, Path]) -> None:
    sub = pred_to_submission(fused.pred(), fused.ids())
    files["submission"] = write_submission(sub, out / "submission.csv", sample=inputs.sample)
    LOGGER.info(f"fuse: {files['submission']} ({len(sub)} rows: every id of {inputs.sample}, checked)")


def fuse(cfg: Config) -> dict:
    """Run fusion on cfg.split. Returns {"dir", "files", "score" (oof: Score), "fused"}."""
    written = open_run_dir(cfg, split_files(run_dir(cfg), cfg.split))
    inputs = load_inputs(cfg)
    describe_inputs(inputs)
    params = fusion_params(cfg)  # cfg: typed and checked at load
    fused = fuse_split(inputs, params, workers=cfg.workers)
    out = written.folder
    forget(out, inputs.split)  # until its last file is written, the record does not vouch for this split
    files = write_tables(out, inputs.split, fused)
    result: dict = {"dir": out, "files": files, "fused": fused, "score": None}
    if inputs.split == "oof":
        result["score"] = write_oof_scores(out, inputs, fused, files)
    else:
        write_test_submission(out, inputs, fused, files)
    cfg.save(out / f"fuse_{inputs.split}.yaml")  # the settings saved always match the scores beside them
    remember(out, inputs.split, make_entry(cfg, inputs.files, params))  # last: what was fused (export reads it)
    LOGGER.info(f"fuse: outputs in {out}")
    return result


def main(cfg: Config) -> dict:
    return fuse(cfg)

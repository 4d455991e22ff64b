"""`siimcovid fuse`: fuse detection and classifier predictions of one split; score OOF, write the submission.

Outputs in <project>/<name>/ (tidy CSVs, written atomically):

    fuse_<split>.yaml     the resolved config
    pred_<split>.csv      the fused predictions in the metric's tidy form, one row per prediction:
                          id (<study>_study / <image>_image), cls (4 study classes, opacity, none),
                          conf, x_min, y_min, x_max, y_max (original px; 0 0 1 1 for study classes and none)
    images_<split>.csv    one row per image: image_id, study_id, fold, rows, cols, n_boxes (fused),
                          none_cls, none_det (NaN without that kind of input), none (the one written)
    studies_<split>.csv   one row per study: study_id, negative, typical, indeterminate, atypical
    boxes_<split>.csv     one row per fused box: image_id, conf (written), wbf_conf (before the
                          (1 - none)^a re-weighting), x_min, y_min, x_max, y_max (original px)
  split=oof:
    scores_oof.csv        one row per fold and one "all": fold, n_images, AP per class, study_map, image_map, final
    scores_oof.json       the "all" score (siimcovid.metrics.Score.to_dict) with the fold table
    oof_submission.csv    the same predictions as a submission (score it again with `siimcovid evaluate`)
  split=test:
    submission.csv        every id of sample_submission.csv, checked; written last
"""

from __future__ import annotations

import json
from pathlib import Path

from siimcovid.config import Config
from siimcovid.fuse.inputs import load_inputs
from siimcovid.fuse.pipeline import (
    Fused,
    check_params,
    describe_inputs,
    fusion_params,
    run_fusion,
    score_fused,
    scores_by_fold,
)
from siimcovid.metrics import Score
from siimcovid.submission import pred_to_submission, write_submission
from siimcovid.tables import write_csv
from siimcovid.tables import write_csv as write_predictions
from siimcovid.utils import LOGGER, atomic_write_text


def run_dir(cfg: Config) -> Path:
    return Path(cfg.project) / str(cfg.name)


def write_tables(out: Path, split: str, fused: Fused) -> dict[str, Path]:
    pred = fused.pred()
    return {
        "pred": write_predictions(pred, out / f"pred_{split}.csv"),
        "images": write_predictions(fused.images, out / f"images_{split}.csv"),
        "studies": write_predictions(fused.studies, out / f"studies_{split}.csv"),
        "boxes": write_predictions(fused.boxes, out / f"boxes_{split}.csv"),
    }


def fuse(cfg: Config) -> dict:
    """Run fusion on cfg.split. Returns {"dir", "files", "score" (oof: Score), "fused"}."""
    params = fusion_params(cfg)
    check_params(params)  # before reading large files
    inputs = load_inputs(cfg)
    describe_inputs(inputs)
    fused = run_fusion(inputs, params, workers=int(cfg.workers))
    out = run_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    files = write_tables(out, inputs.split, fused)
    result: dict = {"dir": out, "files": files, "fused": fused, "score": None}
    if inputs.split == "oof":
        table = scores_by_fold(inputs, fused)
        overall: Score = score_fused(inputs, fused)
        files["scores"] = write_csv(table, out / "scores_oof.csv", float_format="%.6g")
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
            LOGGER.info(
                "per fold:\n" + table.drop(columns=["image_map"]).to_string(index=False, float_format=lambda v: f"{v:.4f}")
            )
        result["score"] = overall
    else:
        sub = pred_to_submission(fused.pred(), fused.ids())
        files["submission"] = write_submission(sub, out / "submission.csv", sample=inputs.sample)
        LOGGER.info(f"fuse: {files['submission']} ({len(sub)} rows: every id of {inputs.sample}, checked)")
    cfg.save(out / f"fuse_{inputs.split}.yaml")  # last: the settings saved always match the scores beside them
    LOGGER.info(f"fuse: outputs in {out}")
    return result


def main(cfg: Config) -> dict:
    return fuse(cfg)

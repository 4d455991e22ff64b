"""The files of a detect run, declared once (siimcovid.engine.family.FoldFiles): its run folder <project>/<name>/
(detect.yaml: the settings and what the run learned, siimcovid.rundir.write_run; what predict writes) and each fold
folder (Ultralytics' run folder: args.yaml, weights/best.pt and last.pt, results.csv, its plots)."""

from siimcovid.engine.family import FoldFiles

START_ARGS = "args_start.yaml"  # a fold's args.yaml as Ultralytics wrote it when the fold started (kept at its first resume)
FILES = FoldFiles(
    settings="detect.yaml",
    best="weights/best.pt",
    last="weights/last.pt",
    done=None,  # Ultralytics' last.pt says so (fold_state)
    # Ultralytics' run folder: its plots under varied names
    fold=("args.yaml", START_ARGS, "results.png", "weights", "labels", "predictions.json", "*.jpg", "*.png"),
    # copies_<folder>.csv: extra='s SIIM copies; distill: distill='s training sets (siimcovid.detect.distill)
    run=("data", "distill", "pred_*.csv", "scores_oof.csv", "predict.yaml", "copies_*.csv"),
    copy_settings=False,  # Ultralytics' args.yaml is the fold folder's trace (detect.train.own_fold)
)

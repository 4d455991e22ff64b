"""The files of a classify run, declared once (siimcovid.engine.family.FoldFiles): its run folder <project>/<name>/
(classify.yaml: the settings and what the run learned, siimcovid.rundir.write_run; what predict writes) and each fold
folder (the layout in siimcovid/classify/train.py's docstring; best.pt's keys: siimcovid.classify.checkpoints)."""

from siimcovid.engine.family import FoldFiles

VAL_IMAGES = "val_pred_image.csv"  # the best epoch's predictions on the fold's held-out images (CLASSIFIER_IMAGES)
VAL_LABELS = "val_pred_labels.csv"  # multi-label pretraining: the best epoch's validation probabilities
DISTILL = "distill_targets.csv"  # distill=: the fold's soft targets from its teachers (tables.DISTILL_TARGETS), a cache
FILES = FoldFiles(
    settings="classify.yaml",
    best="best.pt",
    last="last.pt",
    done="done.json",
    fold=("results.png", VAL_IMAGES, VAL_LABELS, DISTILL),
    run=("pred_*.csv", "scores_oof.csv", "predict.yaml", "copies_*.csv"),  # copies_<folder>.csv: extra='s SIIM copies
)

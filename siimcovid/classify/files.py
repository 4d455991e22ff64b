"""The files of a classify run, declared once (siimcovid.engine.family.FoldFiles): its run folder <project>/<name>/
(classify.yaml: the settings and what the run learned, siimcovid.rundir.write_run; what predict writes) and each fold
folder (the layout in siimcovid/classify/train.py's docstring; best.pt's keys: siimcovid.classify.checkpoints)."""

from siimcovid.engine.family import FoldFiles

FILES = FoldFiles(
    settings="classify.yaml",
    best="best.pt",
    last="last.pt",
    done="done.json",
    fold=("results.png", "val_pred_image.csv", "val_pred_labels.csv"),
)

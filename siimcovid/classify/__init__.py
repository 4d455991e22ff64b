"""Study classifiers: timm backbone + 4-class study head + none head + auxiliary box-mask head.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule). torch is imported only when used, so `import
siimcovid.classify`, `siimcovid <other stage>` and `siimcovid runs` stay light.

Modules:
    train.py        `siimcovid classify train`: main(cfg), train(cfg, ...) folds, waves, EMA, AMP, DDP, resume
    predict.py      `siimcovid classify predict`: main(cfg) OOF / test tables, study aggregation, ensembles, scores
    family.py       TimmFamily, TimmLabelsFamily: the timm study classifier as model families timm, timm-labels
    files.py        FILES: the run folder's and each fold folder's files, declared once
    pretrain.py     LabelTrainer: multi-label pretraining on an external labelled set (the family timm-labels)
    none.py         task=none, the binary none model: check_task, none_ap, its predict table (tables.NONE_IMAGES)
    none_trainer.py NoneTrainer, none_ap_improved, report_oof_none: its fold trainer (best.pt by the none AP)
    optim.py        a fold's optimisation: the fp16 loss scaler, the weight EMA, a wave's optimizer and scheduler
    checkpoints.py  a fold's checkpoints and log: what last.pt holds to resume, best.pt's keys, results.csv
    model.py        build_model(...), StudyNet, StudyLoss (CE + none BCE + mask BCE/Dice), probabilities(...)
    tta.py          tta=none | hflip | vflip | d4: tta_name, tta_views, apply / invert a view, detector_tta (on or off)
    data.py         prepared images + masks -> tensors: image_table, StudyDataset, build_augment, mask-aware mix_batch
    dist.py         torchrun / DDP helpers: setup(), cleanup() (a world of one without torchrun)
    distill.py      distill=: prepare_run (the teachers checked, recorded), soft_targets, distill_hook (a student's targets)
    swa.py          FoldSWA: a fold's SWA (swa_epochs, swa_lr; siimcovid.engine.swa): average, update_bn, best.pt/last.pt
    summary.py      describe(run_dir): the row of a classify run in `siimcovid runs` (yaml and pandas only)
"""

__all__ = [
    "checkpoints", "data", "dist", "distill", "family", "files", "model", "none", "none_trainer", "optim", "predict", "pretrain",
    "summary", "swa", "train", "tta",
]  # fmt: skip

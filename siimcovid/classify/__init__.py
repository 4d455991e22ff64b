"""Study classifiers: timm backbone + 4-class study head + none head + auxiliary box-mask head.

Modules (import torch only when used, so `import siimcovid.classify`, `siimcovid <other stage>`
and `siimcovid runs` stay light):
    model.py    build_model, StudyNet, StudyLoss (CE + none BCE + mask BCE/Dice), probabilities
    data.py     prepared images + masks -> tensors: image_table, StudyDataset, build_augment, mask-aware mix_batch
    train.py    `siimcovid classify train`: main(cfg) (sets up the device group, then train(cfg, dist)):
                folds, waves, EMA, AMP, DDP, resume
    predict.py  `siimcovid classify predict`: main(cfg) OOF / test tables, study aggregation, ensembles, scores_oof.csv
    dist.py     torchrun / DDP helpers: setup, cleanup, pick_device (a world of one without torchrun)
    summary.py  describe(run_dir): the row of a classify run in `siimcovid runs` (yaml and pandas only)

Each stage function takes the stage's Config (`siimcovid.config.load_config("classify", ...)`);
the modes are registered in `siimcovid.stages`.
"""

__all__ = ["data", "dist", "model", "predict", "summary", "train"]

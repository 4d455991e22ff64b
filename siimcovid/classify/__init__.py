"""Study classifiers: timm backbone + 4-class study head + none head + auxiliary box-mask head.

Modules (import torch only when used, so `siimcovid <other stage>` stays light):
    model.py    StudyNet, StudyLoss (CE + none BCE + mask BCE/Dice)
    data.py     prepared images + masks -> tensors, albumentations, mask-aware mixup/cutmix
    train.py    `siimcovid classify train`: folds, waves, EMA, AMP, DDP, resume
    predict.py  `siimcovid classify predict`: OOF / test tables, study aggregation, ensembles
    dist.py     torchrun / DDP helpers (a world of one without torchrun)
"""

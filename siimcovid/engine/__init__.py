"""The fold engine every model family trains and predicts through.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule).

Modules:
    folds.py     train(family), predict(family, ...): fold selection, resume, init= / extra=, serial or Ray dispatch
    family.py    Family, register_family(name), family_class(name, stage): a model family, registered once
    devices.py   parse(device) -> Devices: the one reading of `device=` for every stage and family
    events.py    Events, merge(...): the training events (on_train_start, ..., is_better) every family calls
    tracking.py  tracking_callbacks(tracking, uri): TensorBoard / MLflow, registered under the kind "callback"
    swa.py       SWA, check_swa(cfg, total): SWA of a fold's last epochs (swa_epochs, swa_lr) for every family
    distill.py   check_not_leaky(run, cfg), same_teachers(old, new): what distill='s teachers must be, every stage
"""

__all__ = ["devices", "distill", "events", "family", "folds", "swa", "tracking"]

"""The detection stage: Ultralytics YOLO opacity detectors per fold (train, evolve, predict).

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule). Ultralytics, hence torch, is imported only inside the
functions that train or predict, so `import siimcovid.detect` and `siimcovid runs` stay light.

Modules:
    train.py     `siimcovid detect train`: main(cfg), train(cfg) one YOLO per fold into <project>/<name>/fold<k>/
    predict.py   `siimcovid detect predict`: main(cfg), predict(cfg) OOF and test boxes in ORIGINAL pixels;
                 load_run(run_dir), scores_oof(...)
    evolve.py    `siimcovid detect evolve`: main(cfg), evolve(cfg) Ultralytics' Tuner on one fold -> a hyp preset
    ray_tune.py  `detect evolve engine=ray`: evolve_ray(...) the evolve trials as Ray Tune trials
    family.py    YoloFamily: the Ultralytics detector as a model family (registry kind "detect_family", name yolo)
    files.py     FILES: the run folder's and each fold folder's files, declared once
    common.py    what they share: resolve_data / DataSource, load_hyp / hyp_presets, train_args, check_model,
                 ultralytics_keys() (the settings detect passes through), check_ultralytics_settings(settings)
    summary.py   describe(run_dir): the row of a detect run in `siimcovid runs` (yaml and pandas only)
    crops.py     crop=lung, crop_train: write_crops(...), fold_crops(...) the lung crops as extra training images
    distill.py   distill=: prepare_run(...) the teachers checked, fold_list(...) a fold's labels blended with theirs
    torchvision_family.py  TorchvisionFamily: torchvision's Faster R-CNN / RetinaNet / FCOS (family name torchvision)
    torchvision_train.py   its fold training loop (resume from its last checkpoint, AMP on a GPU)
    torchvision_model.py   build(arch, imgsz, pretrained), new_predictor(model, arch): its detectors
    torchvision_bundle.py  bundle_kind(), check_description(...), check_state(...): its bundle member
"""

__all__ = [
    "common", "crops", "distill", "evolve", "family", "files", "predict", "ray_tune", "summary", "torchvision_bundle",
    "torchvision_family", "torchvision_model", "torchvision_train", "train",
]  # fmt: skip

"""The detection stage: Ultralytics YOLOv5 opacity detectors per fold (train, evolve, predict).

Modules (import Ultralytics, hence torch, only inside the functions that train or predict, so
`import siimcovid.detect` and `siimcovid runs` stay light):
    train.py    `siimcovid detect train`: train(cfg) one YOLO per fold into <project>/<name>/fold<k>/, resumable
    predict.py  `siimcovid detect predict`: predict(cfg) OOF and test boxes in ORIGINAL pixels, load_run, the OOF scores
    evolve.py   `siimcovid detect evolve`: evolve(cfg) Ultralytics' hyperparameter Tuner on one fold -> a hyp preset
    common.py   what they share: resolve_data / DataSource, load_hyp / hyp_presets, train_args, check_model,
                ultralytics_keys (the settings detect passes through), fold_state
    summary.py  describe(run_dir): the row of a detect run in `siimcovid runs` (yaml and pandas only)

Each stage function takes the stage's Config (`siimcovid.config.load_config("detect", ...)`);
the modes are registered in `siimcovid.stages`.
"""

__all__ = ["common", "evolve", "predict", "summary", "train"]

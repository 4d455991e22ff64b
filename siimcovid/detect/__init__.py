"""The detection stage: Ultralytics YOLOv5 opacity detectors per fold (train, evolve, predict)."""

"""The data: the SIIM download (real or synthetic), its conversion into a prepared folder, the truth.

Modules:
    siim.py      the SIIM layout and CSVs: read_image_level, read_study_level, find_dicoms, load_train, load_test
    synth.py     `siimcovid synth`: generate(cfg) a synthetic dataset in exactly that layout; is_synthetic
    prepare.py   `siimcovid prepare`: prepare(cfg) DICOMs -> images, YOLO labels, masks, folds, meta.csv
    prepared.py  Prepared(dir): read access to a prepared folder; select_folds (THE fold=all|k|list parser)
    truth.py     THE ground truth (unclipped CSV boxes): load_truth, truth_rows, oof_images, oof_truth
    dicom.py     DICOM -> 8-bit image: dicom_to_uint8, read_header
    convert.py   one DICOM's conversion (a prepare worker): convert_one
    boxes.py     box conventions: scale_boxes, clip_boxes, to_yolo / from_yolo, boxes_to_json / boxes_from_json
    folds.py     make_folds: grouped by patient, stratified by study class and box presence
    layout.py    where the prepared files live: image_file, label_file, mask_file
    summary.py   describe(run_dir): the row of a prepared folder in `siimcovid runs` (yaml and pandas only)
"""

__all__ = ["boxes", "convert", "dicom", "folds", "layout", "prepare", "prepared", "siim", "summary", "synth", "truth"]

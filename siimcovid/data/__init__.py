"""The data: the SIIM download (real or synthetic), its conversion into a prepared folder, the truth.

`__all__` names every module of the package; each line below names the module's public functions
(see siimcovid/__init__.py for the rule).

Modules:
    siim.py            the SIIM layout and CSVs: read_image_level, read_study_level, find_dicoms, load_train, load_test
    synth.py           `siimcovid synth`: main(cfg), generate(cfg) a synthetic dataset in exactly that layout;
                       is_synthetic(root)
    synth_external.py  `synth kind=rsna | chestxray14 | chexpert | pool`: generate_external(cfg), registered as
                       "synth" names: external sets in their real download layouts
    prepare.py         `siimcovid prepare`: main(cfg), prepare(cfg) DICOMs -> images, YOLO labels, masks, folds, meta
    layouts.py         siim_layout(root, splits, problems): the layout siim, and the rows every layout gives
    external.py        rsna_layout(...), csv_layout(...): the layouts rsna and csv (external labelled sets)
    folder.py          folder_layout(...): the layout folder (any tree of DICOMs or images, unlabelled)
    extra.py           ExtraData(root), extra_roots(...): extra training data (external sets, pseudo-labels) per fold
    dedup.py           image_hash(path), find_copies(...), siim_copies(...): pool images that are SIIM's own (perceptual hash)
    prepared.py        Prepared(dir): read access to a prepared folder; select_folds(...) (THE fold=all|k|list parser)
    truth.py           THE ground truth (unclipped CSV boxes): load_truth, truth_rows, oof_images, oof_truth
    dicom.py           DICOM -> 8-bit image: dicom_to_uint8(...), read_header(...)
    convert.py         one DICOM's conversion (a prepare worker): convert_one(...)
    boxes.py           box conventions: scale_boxes, clip_boxes, to_yolo / from_yolo, boxes_to_json / boxes_from_json
    folds.py           make_folds(...): grouped by patient, stratified by study class and box presence
    prepared_paths.py  where the prepared files live: image_file(...), label_file(...), mask_file(...)
    summary.py         describe(run_dir): the row of a prepared folder in `siimcovid runs` (yaml and pandas only)
    lungs.py           read_lung_boxes(...): the lung boxes of prepare lung_boxes= (Pascal VOC .xml or YOLO .txt)
"""

__all__ = [
    "boxes",
    "convert",
    "dedup",
    "dicom",
    "external",
    "extra",
    "folder",
    "folds",
    "layouts",
    "lungs",
    "prepare",
    "prepared",
    "prepared_paths",
    "siim",
    "summary",
    "synth",
    "synth_external",
    "truth",
]

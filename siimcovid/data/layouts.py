"""Input layouts `siimcovid prepare` reads, registered by name (`prepare layout=<name>`).

A layout turns a data root into the rows prepare converts, one per image:

    image_id     unique id of the image (file names and every table key on it)
    study_id     the study it belongs to (SIIM: StudyInstanceUID; grouped into one prediction)
    series_id    series (free text; '' when unknown)
    path         the image file (DICOM; other layouts may also give PNG/JPG)
    boxes        [[x_min, y_min, x_max, y_max], ...] in original pixels ([] when none or unknown)
    study_label  the study class ('' when unlabelled)
    line         the CSV line the row came from (None when it came from the file tree)
    split        train | test

    @register("layout", "siim")
    def siim_layout(root: Path, splits: list[str], problems: Problems) -> pd.DataFrame: ...

A layout in another module registers itself there: siim here, rsna and csv in external.py, folder in
folder.py (siimcovid.registry.BUILTINS["layout"] names these so `prepare layout=` knows them unimported).
Your own module needs no edit of siimcovid: its import registers it (see siimcovid.registry for the
entry point that makes the command line import it).
Bad inputs go to `problems` (it raises unless on_error=skip), naming file and line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from siimcovid.data.siim import Problems, load_test, load_train
from siimcovid.registry import register

ROW_COLUMNS = ["image_id", "study_id", "series_id", "path", "boxes", "study_label", "line", "split"]


@register("layout", "siim")
def siim_layout(root: Path, splits: list[str], problems: Problems) -> pd.DataFrame:
    """The competition's layout: train/ and test/ DICOM trees, the two train CSVs, sample_submission.csv."""
    frames = []
    if "train" in splits:
        frames.append(load_train(root, problems).assign(split="train"))
    if "test" in splits:
        test = load_test(root, problems)
        test["split"], test["boxes"], test["study_label"], test["line"] = "test", [[]] * len(test), "", None
        frames.append(test)
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True)[ROW_COLUMNS] if frames else pd.DataFrame(columns=ROW_COLUMNS)

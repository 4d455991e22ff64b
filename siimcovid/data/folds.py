"""Cross-validation folds: grouped by patient, stratified by study class and box presence.

A patient's images must all land in one fold, or CV leaks (one team found exactly that
leak in two of their folds). A study belongs to one patient, but to be safe against
inconsistent headers we group by the connected components of "same patient" and
"same study", so neither a patient nor a study is ever split.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from siimcovid.utils import SiimError


def connected_groups(patient_ids, study_ids) -> np.ndarray:
    """Group index per image: images sharing a patient or a study share a group."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p, s in zip(patient_ids, study_ids):
        ra, rb = find(("p", p)), find(("s", s))
        if ra != rb:
            parent[ra] = rb
    roots = [find(("s", s)) for s in study_ids]
    _, index = np.unique(np.array([repr(r) for r in roots]), return_inverse=True)
    return index


def make_folds(df: pd.DataFrame, n_folds: int = 5, seed: int = 42) -> np.ndarray:
    """Fold per row of `df` (columns patient_id, study_id, study_label, boxes; optional stratum).

    Patients with an empty PatientID are treated as one patient per study.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # here: importing sklearn costs seconds (predict never folds)

    if n_folds < 2:
        raise SiimError(f"n_folds must be at least 2, got {n_folds}")
    patients = [p if p else f"study:{s}" for p, s in zip(df.patient_id, df.study_id)]
    groups = connected_groups(patients, list(df.study_id))
    n_groups = len(np.unique(groups))
    if n_groups < n_folds:
        raise SiimError(f"only {n_groups} patients for {n_folds} folds: lower n_folds")
    has_box = np.array([len(b) > 0 for b in df.boxes])
    strata = np.array([f"{c}|{int(b)}" for c, b in zip(df.study_label, has_box)])
    if "stratum" in df:  # an external set (no study class) names what to stratify on: its first label, its boxes
        strata = np.array([s or f"|{int(b)}" for s, b in zip(df.stratum.fillna(""), has_box)])
    folds = np.full(len(df), -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # Rare strata (fewer members than folds) are expected on small data; sklearn warns.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(df)), strata, groups)):
                folds[val_idx] = k
        except ValueError as e:  # sklearn: no stratum has n_folds members
            counts = {str(k): int(v) for k, v in zip(*np.unique(strata, return_counts=True))}
            raise SiimError(
                f"n_folds={n_folds} is too many for {len(df)} images (images per class|has-box: {counts}): lower n_folds"
            ) from e
    return folds

"""Fusion: WBF over models / folds / TTA, none and opacity formulas, and the submission file."""

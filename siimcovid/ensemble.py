"""Combining ensemble members' probabilities: the one implementation behind `classify predict
ensemble=` and `fuse cls_ensemble=`.

A method is a pair of maps registered under the kind "ensemble": `to` maps each member's
(n, k) probabilities into the space where members are averaged with weights, `back` maps the
average back. Adding a method is one registered `Method` (`registry.add("ensemble", name, Method(to, back))`).

    mean       the weighted mean
    geometric  (alias geomean) the weighted geometric mean: exp of the weighted mean log, probabilities
               clipped at 1e-7; a member sure that a class is absent vetoes it
    rank       the weighted mean of each column's percentile rank in (0, 1]: members on different
               scales count alike; AP reads only the ranking within a class
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from siimcovid import registry
from siimcovid.utils import SiimError

EPS = 1e-7


@dataclass(frozen=True)
class Method:
    to: Callable[[np.ndarray], np.ndarray]
    back: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


registry.add("ensemble", "mean", Method(_identity, _identity))
registry.add("ensemble", "geometric", Method(lambda x: np.log(np.clip(x, EPS, 1.0)), np.exp), aliases=("geomean",))
registry.add("ensemble", "rank", Method(lambda x: pd.DataFrame(x).rank(pct=True).to_numpy(), _identity))


def methods() -> list[str]:
    return registry.names("ensemble")


def combine(members: list[np.ndarray], weights=None, method: str = "mean") -> np.ndarray:
    """Members' probability arrays (same rows, same columns) -> one array: the weighted `method`.

    weights: one non-negative number per member, not all 0 (None or [] = equal); normalised."""
    if method not in methods():
        raise SiimError(f"ensemble method {method!r}: expected one of {', '.join(methods())}")
    if not members:
        raise SiimError("no ensemble members to combine")
    m = registry.get("ensemble", method)
    w = np.ones(len(members)) if weights is None or len(weights) == 0 else np.asarray(weights, dtype=np.float64)
    if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
        raise SiimError(f"ensemble weights: need {len(members)} non-negative weights, not all 0; got {list(w)}")
    stack = np.stack([m.to(np.asarray(a, dtype=np.float64)) for a in members])
    return m.back(np.tensordot(w / w.sum(), stack, axes=1))

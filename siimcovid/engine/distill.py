"""What distillation's teachers must be, for every stage (`classify train distill=`: siimcovid.classify.distill; `detect
train distill=`: siimcovid.detect.distill): never leaky, and the same on a resume.

A student run records each teacher in what it learned (`distill_teachers`: [{run, folds_id, best_sha256: {fold: sha256 of
its checkpoint}}], every finished fold of the teacher at the time). A resume, or the next fold trained by another
command (fold=k per job), must name the same teacher runs of the same folds_id, each fold recorded both times with the
same checkpoint: a teacher that finished another fold since is no change, one retrained in place is (`same_teachers`).
"""

from __future__ import annotations

from pathlib import Path

from siimcovid.utils import SiimError


def check_not_leaky(run: Path, cfg: dict) -> None:
    """A teacher trained on all-folds pseudo-labels (extra= of `pseudo teacher=all`) saw every fold's validation images
    through them: a student of it would be leaky, so it is refused (`siimcovid runs` flags that teacher LEAKY)."""
    from siimcovid.runs import leaky_extras

    leaky = leaky_extras(cfg)
    if leaky:
        raise SiimError(
            f"distill={run} trained on all-folds pseudo-labels (extra={leaky[0]}, pseudo teacher=all): its fold k learnt "
            "from models that saw fold k's validation images, so a student of it would be leaky; use a teacher trained on "
            "teacher=fold pseudo-labels (or none)"
        )


def same_teachers(old, new) -> bool:
    """Whether the distill_teachers a run recorded and those of its resume are the same (module docstring)."""
    old, new = list(old or []), list(new or [])
    if len(old) != len(new):
        return False
    for a, b in zip(old, new):
        if not isinstance(a, dict) or not isinstance(b, dict):
            return False
        if a.get("run") != b.get("run") or a.get("folds_id") != b.get("folds_id"):
            return False
        sa, sb = a.get("best_sha256") or {}, b.get("best_sha256") or {}
        if any(str(sa[k]) != str(sb[k]) for k in set(sa) & set(sb)):
            return False
    return True

"""The training events every model family calls, in the spirit of Ultralytics' callbacks.

`siimcovid <stage> train` (or `engine.train(cfg, callbacks={event: fn or [fn]})`) adds functions to these events
without touching a training loop. Every function is called with the fold's trainer first; the trainer has at least
`stage`, `family`, `fold`, `dir` (the fold folder), `run_dir`, `project`, `settings` (the run's settings), `epoch`
(1-based, the epoch in progress or just finished) and `is_main` (False on other DDP ranks).

    on_train_start(trainer)                  the fold starts (or resumes), before its first epoch
    on_train_epoch_start(trainer)            an epoch starts
    on_train_epoch_end(trainer)              its training steps are done, before validation
    on_fit_epoch_end(trainer, row)           after the epoch's checkpoints and log are written; row = its results.csv row
    on_model_save(trainer)                   after the epoch's checkpoints are written
    on_train_end(trainer, summary)           the fold is finished; summary = its done record (best_score, best_epoch, ...)
    on_train_data(trainer)                   before the training loader is built (a classifier's): may replace
                                             trainer.train_dataset (e.g. add pseudo-labelled or extra images)
    on_loss(trainer, out, batch, parts)      each training step, after the loss: {name: tensor} extra terms, added
                                             to the loss and logged as train_<name> (a classifier's)
    is_better(trainer, stats, best) -> bool  the checkpoint rule, the last one added decides: which epoch is best.pt
                                             (every family's; the first epoch's always is)

The detector (Ultralytics) maps its own callbacks onto these (siimcovid.detect.family); Ultralytics builds its data
and loss itself, so on_train_data and on_loss are the classifier's (given to a detector: one error). Ultralytics' own
integrations keep working beside them. With no function added, training is exactly the plain loop: events draw no random numbers.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from siimcovid.utils import SiimError, as_list

EVENTS = (
    "on_train_start",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_fit_epoch_end",
    "on_model_save",
    "on_train_end",
    "on_train_data",
    "on_loss",
    "is_better",
)


def merge(*sets: Mapping[str, Callable | Iterable[Callable]] | None) -> dict[str, list[Callable]]:
    """Callback sets ({event: fn or [fn, ...]}) joined in order, every event name checked."""
    out: dict[str, list[Callable]] = {}
    for callbacks in sets:
        for event, fns in (callbacks or {}).items():
            if event not in EVENTS:
                raise SiimError(f"unknown training event '{event}': expected one of {', '.join(EVENTS)}")
            out.setdefault(event, []).extend(as_list(fns))
    return out


class Events:
    """What a trainer mixes in: its callbacks and how they run."""

    callbacks: dict[str, list[Callable]]

    def init_callbacks(self, defaults: Mapping | None = None, added: Mapping | None = None) -> None:
        self.callbacks = {event: [] for event in EVENTS}
        for event, fns in merge(defaults, added).items():
            self.callbacks[event].extend(fns)

    def add_callback(self, event: str, fn: Callable) -> None:
        if event not in self.callbacks:
            raise SiimError(f"unknown training event '{event}': expected one of {', '.join(self.callbacks)}")
        self.callbacks[event].append(fn)

    def run_callbacks(self, event: str, *args) -> list:
        """Call the event's functions in the order added, with the trainer first; their results."""
        return [fn(self, *args) for fn in self.callbacks[event]]

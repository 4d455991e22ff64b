"""`device`: one reading for every stage and model family.

    null | auto        the first GPU when there is one, else the CPU
    cpu | mps          no CUDA GPU
    0 | cuda | cuda:0  one GPU (a number is a CUDA index, as in Ultralytics)
    0,1 | [0, 1]       several GPUs (a detector trains them with Ultralytics DDP; a classifier with torchrun)

`parse` reads it once; the families take what they hand on from the result: Ultralytics' device argument
(`ultralytics`), a torch.device (`torch_device`), the GPUs of a Ray task (`in_ray_task`); `check_ray` is the one check
of how `device` and gpus_per_fold combine under engine=ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from siimcovid.utils import SiimError


@dataclass(frozen=True)
class Devices:
    """A parsed `device`: kind "auto", "cpu", "mps" or "cuda"; the CUDA indices it names (() for cuda without one)."""

    given: Any
    kind: str
    indices: tuple[int, ...] = ()

    @property
    def count(self) -> int | None:
        """GPUs asked for: None (auto: the first if any), 0 (cpu, mps), 1, 2, ..."""
        if self.kind == "auto":
            return None
        return 0 if self.kind in ("cpu", "mps") else max(len(self.indices), 1)

    @property
    def text(self) -> str:
        """As Ultralytics reads it: '', 'cpu', 'mps', '0', '0,1' (cuda without an index: '0')."""
        if self.kind in ("auto", "cpu", "mps"):
            return "" if self.kind == "auto" else self.kind
        return ",".join(str(i) for i in self.indices or (0,))


def parse(device: Any) -> Devices:
    """`device` as given on the command line, in a settings file or by a caller -> Devices (module docstring)."""
    if isinstance(device, (list, tuple)):
        device = ",".join(str(d) for d in device)
    if device is None or isinstance(device, bool):
        if device is None:
            return Devices(None, "auto")
        raise SiimError(f"device={device}: expected cpu, cuda, cuda:<k>, a GPU number k or a list 0,1")
    text = str(device).strip().lower().replace(" ", "")
    if text in ("", "auto"):
        return Devices(device, "auto")
    if text in ("cpu", "mps"):
        return Devices(device, text)
    if text == "cuda":
        return Devices(device, "cuda")
    parts = [p[5:] if p.startswith("cuda:") else p for p in text.split(",") if p]
    if not parts or not all(p.isdigit() for p in parts):
        raise SiimError(f"device={device}: expected cpu, cuda, cuda:<k>, a GPU number k or a list 0,1")
    return Devices(device, "cuda", tuple(int(p) for p in parts))


def ultralytics(device: Any) -> Any:
    """Ultralytics' device argument: None stays None (its own choice), a list becomes '0,1' (DDP), the rest as given."""
    if isinstance(device, (list, tuple)):
        return ",".join(str(d) for d in device)
    return device


def torch_device(device: Any, local_rank: int = 0):
    """The torch.device one process uses (torchrun: each process its LOCAL_RANK's GPU when cuda names no index)."""
    import torch

    d = parse(device)
    if d.kind == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if d.kind in ("cpu", "mps"):
        return torch.device(d.kind)
    if len(d.indices) > 1:
        raise SiimError(f"device={device}: one process uses one GPU; for several use torchrun --nproc_per_node=N (see README)")
    if not torch.cuda.is_available():
        raise SiimError(f"device={device} but CUDA is not available here; use device=cpu")
    return torch.device(f"cuda:{d.indices[0] if d.indices else local_rank}")


def from_torch(device) -> str | int:
    """A torch.device -> Ultralytics' device argument ('cpu' or the GPU's index)."""
    return (device.index or 0) if device.type == "cuda" else "cpu"


def check_ray(device: Any, gpus: float, world: int = 1) -> None:
    """engine=ray: each fold is one Ray task in one process, on at most one GPU (module docstring of ray_engine)."""
    if world > 1:
        raise SiimError(
            "engine=ray trains each fold in one process of its own; under torchrun (DDP inside a fold) use engine=serial"
        )
    n = parse(device).count
    if (n is not None and n > 1) or gpus > 1:
        # DDP ranks run in sessions of their own: a task killed by Ray (memory, a lost node) would leave them training
        # while Ray's retry trains the same fold beside them
        raise SiimError(
            f"engine=ray trains each fold on at most one GPU (device={device}, gpus_per_fold={gpus:g}): DDP inside a fold "
            "and engine=ray do not combine; use one or the other"
        )
    if n == 0 and gpus > 0:
        raise SiimError(f"engine=ray: device={device} trains on the CPU; set gpus_per_fold=0")
    if n == 1 and not 0 < gpus <= 1:
        raise SiimError(
            f"engine=ray: device={device} trains each fold on one GPU: gpus_per_fold must be more than 0 and at most 1 "
            f"(0.5: two folds share a GPU), not {gpus:g}"
        )


def in_ray_task(device: Any, gpus: list[str]) -> str:
    """Inside a fold's Ray task: `device` as the GPUs Ray gave the task (CUDA numbers of the node): device=0 would
    take the node's first GPU whichever the task got. No GPU given: the CPU."""
    if parse(device).count == 0:
        return device
    return gpus[0] if gpus else "cpu"

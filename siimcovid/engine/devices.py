"""`device`: one reading for every stage and model family.

    null | auto        the first GPU when there is one, else the CPU
    cpu | mps          no CUDA GPU
    0 | cuda | cuda:0  one GPU (a number is a CUDA index, as in Ultralytics)
    0,1 | [0, 1]       several GPUs (a detector trains them with Ultralytics DDP; a classifier with torchrun)

`parse` reads it once; the families take what they hand on from the result: Ultralytics' device argument
(`ultralytics`), a torch.device (`torch_device`), the GPUs of a Ray task (`in_ray_task`); `check_ray` is the one check
of how `device` and gpus_per_fold combine under engine=ray.

`precision` (inference on the CPU; a GPU's is `half`): `cpu_precision` reads it once for every family, `cpu_autocast`
is the context its models predict under.

    fp32   as trained (the default: `predict` then writes what the run's own tables say, byte for byte)
    bf16   torch.autocast(cpu, bfloat16) (and channels_last for classifiers): on a CPU with AVX-512 BF16 or AMX several
           times faster; on other CPUs torch emulates bf16, slower than fp32
    auto   bf16 where the CPU has AVX-512 BF16 or AMX (cpu_has_bf16), else fp32
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
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


# ---------------------------------------------------------------- precision on the CPU

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names of the instructions that compute bf16 natively


@lru_cache(maxsize=4)
def cpu_has_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX, as Linux's /proc/cpuinfo lists its flags). torch's
    own check (mkldnn bf16 support) also says yes to CPUs that emulate it with AVX-512, where bf16 is slower than fp32;
    another system (no /proc/cpuinfo): no."""
    try:
        words = set(Path(cpuinfo).read_text(errors="replace").split())
    except OSError:
        return False
    return any(flag in words for flag in BF16_FLAGS)


def cpu_precision(device, precision: str | None) -> str:
    """What a model on `device` computes in on the CPU: "bf16" or "fp32" (module docstring). A GPU: "fp32" here (its
    `half` setting decides its fp16)."""
    precision = precision or "fp32"
    if precision not in ("fp32", "bf16", "auto"):
        raise SiimError(f"precision={precision}: expected fp32, bf16 or auto")
    if precision == "fp32":  # before the device is read: fp32 is the path it always was (device=-1 included)
        return "fp32"
    kind = device.type if hasattr(device, "type") else torch_device(device).type
    if kind != "cpu":
        return "fp32"
    return "bf16" if precision == "bf16" or (precision == "auto" and cpu_has_bf16()) else "fp32"


@contextmanager
def cpu_autocast(device, precision: str | None):
    """torch.autocast(cpu, bfloat16) where cpu_precision says bf16, else nothing."""
    import torch

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_precision(device, precision) == "bf16"):
        yield


def check_run_precision(stage: str, device, precision: str | None, source) -> str:
    """`detect predict` / `classify predict`: the precision that will run, logged once; bf16 into a run's own tables
    (no source=) refused: fuse, `siimcovid run` and `export` take those as the run's fp32 predictions, so a bundle
    would no longer reproduce the run's submission."""
    from siimcovid.utils import LOGGER

    chosen = cpu_precision(device, precision)
    if chosen == "bf16" and not source:
        raise SiimError(
            f"{stage} predict precision={precision} (bf16 on this CPU) would write the run's own prediction tables, which "
            f"fuse and export take as its fp32 ones: predict in bf16 with source=<prepared folder> out=<folder>, or "
            "with `siimcovid predict` on a bundle"
        )
    if precision not in (None, "fp32"):
        has = "has" if cpu_has_bf16() else "lacks"
        LOGGER.info(f"{stage} predict: precision={precision}: {chosen} (this CPU {has} AVX-512 BF16 / AMX)")
    return chosen

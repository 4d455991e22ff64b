"""`engine=ray`: siimcovid's work spread over a Ray cluster (Ray is optional: `pip install siimcovid[ray]`).

`ray_address=null` starts a local Ray cluster for the command on this machine's loopback interface (127.0.0.1: nothing
listens on the network) and stops it at the end; `ray_address=<head>:6379` joins a cluster started with `ray start`.
A cluster already joined in this process (`ray.init` by the caller, as the tests do) is used as it is and left running.

Folds as Ray tasks (`run_folds`): each fold is one task asking for `gpus_per_fold` GPUs and `cpus_per_fold` CPUs, that
runs the stage's own per-fold function, the one the serial path calls, so skip and resume are the same: a task whose
process or node dies is run again by Ray (FOLD_RETRIES times) and resumes the fold from its last checkpoint; re-running
the command resumes it too. Every node must see the run folders, the prepared data and the driver's working directory
at the same paths (a shared disk), and have the same siimcovid installed: a task works in the driver's working directory,
so relative paths mean on every node what they mean on the machine that started the command.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from siimcovid.utils import LOGGER, SiimError

INSTALL = "pip install siimcovid[ray]"
FOLD_RETRIES = 3  # times Ray runs a fold's task again after its process or node died (each run resumes the fold)


def import_ray():
    """The ray module, or the one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise SiimError(f"engine=ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def _loopback_only(ray) -> None:
    """Make a local cluster use 127.0.0.1 as its node address (Ray's own setting for single-machine use on macOS and
    Windows): otherwise Ray picks the machine's network address and listens on every interface.
    Checked by tests/test_ray_folds.py (the node's address is 127.0.0.1)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported (and by the processes it starts)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # ray may have been imported before the variable was set


@contextmanager
def cluster(address: str | None, **local: Any) -> Iterator[Any]:
    """The ray module, joined to a cluster for the duration of the block.

    address None: a local cluster on the loopback interface (`local`: ray.init keywords, e.g. num_cpus=2), shut down
    at the end; else the cluster at `address` (host:port of the head started with `ray start --head`), left running.
    """
    ray = import_ray()
    if ray.is_initialized():
        LOGGER.info("ray: using the Ray cluster this process has already joined")
        yield ray
        return
    if address:
        LOGGER.info(f"ray: joining the Ray cluster at {address}")
        ray.init(address=address)
    else:
        _loopback_only(ray)
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", **local)
        LOGGER.info(f"ray: started a local Ray cluster on 127.0.0.1 ({resources_text(ray.cluster_resources())})")
    try:
        yield ray
    finally:
        ray.shutdown()


def resources_text(res: dict) -> str:
    return ", ".join(f"{res.get(k, 0):g} {k}" for k in ("CPU", "GPU"))


def check_fits(ray, gpus: float, cpus: float, what: str) -> None:
    """A task asking for more than any node has would wait forever: a clear error instead."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("GPU", 0) >= gpus and n.get("CPU", 0) >= cpus for n in nodes):
        have = "; ".join(resources_text(n) for n in nodes) or "no live node"
        hint = " (gpus_per_fold=0 trains on CPUs)" if gpus > 0 else ""
        raise SiimError(f"{what} asks each task for {gpus:g} GPU and {cpus:g} CPU, more than any Ray node has ({have}){hint}")


def task_gpus() -> list[str]:
    """Inside a task: the GPUs Ray gave it (as CUDA numbers of the node); [] for none."""
    import ray

    return [str(g) for g in ray.get_gpu_ids()]


def _in_driver_cwd(cwd: str, fn: Callable, args: tuple) -> Any:
    """A task's body: fn(*args) in the driver's working directory (a node that lacks it lacks the shared disk)."""
    if not Path(cwd).is_dir():
        import socket

        raise SiimError(
            f"{socket.gethostname()}: the directory {cwd} the command was started in is not here; engine=ray needs "
            "the run folders and the data on a disk every node mounts at the same path"
        )
    os.chdir(cwd)
    return fn(*args)


def run_folds(
    fn: Callable, fold_args: dict[int, tuple], address: str | None, gpus: float, cpus: float, stage: str
) -> dict[int, Any]:
    """fn(*fold_args[k]) for every fold k, each a Ray task; returns {fold: its result} once every task has ended.

    fn must be importable by name (a module-level function): the tasks run it wherever Ray places them. A fold whose
    task fails does not stop the others; the first failure is raised once they have all ended (a SiimError as itself).
    """
    with cluster(address) as ray:
        check_fits(ray, gpus, cpus, f"{stage} train engine=ray")
        task = ray.remote(num_gpus=gpus, num_cpus=cpus, max_retries=FOLD_RETRIES)(_in_driver_cwd)
        cwd = os.getcwd()
        refs = {k: task.options(name=f"{stage} fold{k}").remote(cwd, fn, args) for k, args in fold_args.items()}
        LOGGER.info(f"{stage} train: {len(refs)} folds as Ray tasks ({gpus:g} GPU, {cpus:g} CPU each)")
        results, errors = {}, {}
        for k, ref in refs.items():
            try:
                results[k] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the fold's code raised
                errors[k] = e.cause if isinstance(e.cause, SiimError) else e
            except ray.exceptions.RayError as e:  # its process or node died FOLD_RETRIES + 1 times, or it was cancelled
                errors[k] = SiimError(
                    f"{stage} fold {k}: its Ray task did not finish after {FOLD_RETRIES + 1} attempts "
                    f"({type(e).__name__}); run the same command again to resume it"
                )
        for k, e in errors.items():
            LOGGER.error(f"{stage} fold {k} failed: {e}")
        if errors:
            raise next(iter(errors.values()))
        return results

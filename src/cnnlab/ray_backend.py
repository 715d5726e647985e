"""Running a plan's units in parallel on Ray (`--backend ray`), with the same results as one at a time.

`run_units_on_ray` starts a pool of Ray actors, as many as the cluster can run at once with
`hardware.threads` CPUs (and `gpus_per_unit` GPUs) each. Every actor loads the run's data once
and then trains the units it is given one after another with `runner.train_unit`, exactly as the
local backend does: the same plan, the same hardware, `hardware.threads` torch threads, the same
run folder. The driver hands out the units one at a time, so a long unit does not hold up the others,
and calls `on_outcome` (MLflow tracking) as each unit ends; the workers never do.

Workers write their units' files into the run folder themselves, and read the dataset from the
plan's data folder (or the download cache). On a cluster of several machines both must therefore be
shared storage mounted at the same path on every machine (and cnnlab and its dependencies installed
on each); a single machine (the default local Ray instance) needs nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnnlab.config import Hardware, RunPlan, Unit
from cnnlab.engine import DeviceData
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.hardware import check_available
from cnnlab.image_folders import load_selection
from cnnlab.results import UnitStatus
from cnnlab.runfolder import RunFolder, first_line
from cnnlab.runner import RunOutcome, UnitOutcome, outcome_of, pending_units, train_unit

RAY_MISSING = "--backend ray needs Ray: pip install 'cnnlab[ray]'"
# After Ctrl-C, how long the driver waits for the killed actors' units to stop.
STOP_SECONDS = 10.0


class UnitWorker:
    """A Ray actor's body: the run's data, loaded once, and `train_unit` for each unit it is given.

    The data is loaded by the first unit rather than in the constructor, so a data folder missing
    on a worker's machine comes back as that error, not as a dead actor."""

    def __init__(self, folder: str, plan: RunPlan, hardware: Hardware) -> None:
        self.folder = RunFolder(Path(folder))
        self.plan = plan
        self.hardware = _worker_hardware(hardware)
        self.data: DeviceData | None = None

    def train(self, unit: Unit) -> UnitOutcome:
        torch.set_num_threads(self.hardware.threads)  # loading too: the actor was given these CPUs
        if self.data is None:
            dataset = load_selection(self.plan.data)
            self.data = DeviceData(dataset, self.plan.data, check_available(self.hardware))
        return train_unit(self.folder, unit, self.data, self.hardware)


def _worker_hardware(hardware: Hardware) -> Hardware:
    """The hardware in a worker: Ray shows an actor only the GPUs it was given, so `cuda:N` is `cuda`."""
    if hardware.device.startswith("cuda:"):
        return dataclasses.replace(hardware, device="cuda")
    return hardware


def run_units_on_ray(
    folder: RunFolder,
    plan: RunPlan,
    hardware: Hardware,
    *,
    address: str | None = None,
    gpus_per_unit: float | None = None,
    on_outcome: Callable[[UnitOutcome], None] | None = None,
) -> RunOutcome:
    """Train every unit of the plan that is not finished, in parallel on Ray, and return the run's outcome.

    Without `address`, a local Ray instance sized to this machine (all its CPUs, the GPUs PyTorch
    sees) is started and shut down at the end, also on an error or Ctrl-C (a Ray instance this process
    already started with `ray.init` is used as it is and left running). With `address` ("HOST:PORT",
    "ray://HOST:PORT" or "auto") the units run on that cluster, which is only disconnected from.

    Each unit asks Ray for `hardware.threads` CPUs and `gpus_per_unit` GPUs (default: 1 on a CUDA
    device, else 0; 0.25 packs four units on a GPU). Several machines need the run folder and the data
    folder on shared storage at the same path (see the module's docstring).

    A unit that fails at run time is recorded as failed and the others go on; a worker that dies
    (killed, out of memory, its machine lost) fails its unit with that reason, which `--resume` trains
    again from its last checkpoint, and a new worker takes the remaining units. A user error raised in
    a worker (a damaged file) stops the run as it does locally. Ctrl-C stops the workers, leaves the
    units they were training resumable, and raises KeyboardInterrupt.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    gpus = _gpus_per_unit(hardware, gpus_per_unit)
    units = pending_units(folder, plan)
    if not units:
        return outcome_of(folder, plan)
    owned = not ray.is_initialized()
    if owned:
        _connect(ray, address)
    try:
        _train_on_ray(ray, folder, plan, hardware, units, gpus, on_outcome)
    finally:
        if owned:
            ray.shutdown()  # a local instance stops; a cluster is only disconnected from
    return outcome_of(folder, plan)


def _gpus_per_unit(hardware: Hardware, gpus_per_unit: float | None) -> float:
    """The GPUs each unit asks Ray for, checked against the run's device."""
    on_cuda = hardware.device.startswith("cuda")
    if gpus_per_unit is None:
        return 1.0 if on_cuda else 0.0
    gpus = gpus_per_unit
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not math.isfinite(gpus) or gpus < 0:
        raise ConfigError(f"--gpus-per-unit must be a number >= 0, got {gpus!r}")
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"--gpus-per-unit must be a fraction below 1 or a whole number, got {gpus}")
    if on_cuda and gpus == 0:
        raise ConfigError(
            f"--gpus-per-unit 0 leaves the units without a GPU but the run's device is {hardware.device}; "
            "give a positive number of GPUs per unit, or --device cpu"
        )
    if not on_cuda and gpus > 0:
        raise ConfigError(
            f"--gpus-per-unit {gpus:g} needs a CUDA device but the run's device is {hardware.device}; "
            "leave --gpus-per-unit out or use --device cuda"
        )
    return float(gpus)


def _connect(ray: Any, address: str | None) -> None:
    """Start a quiet local Ray instance sized to this machine, or connect to the cluster at `address`."""
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        # address="local": a new instance even where RAY_ADDRESS names a cluster. Ray counts the CPUs
        # this process may use (cgroup limits included); the GPUs are those PyTorch sees.
        ray.init(address="local", num_gpus=torch.cuda.device_count(), **quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise ConfigError(f"--ray-address {address}: cannot connect to a Ray cluster ({first_line(exc)})") from None


def _capacity(ray: Any, cpus: int, gpus: float) -> int:
    """How many units the cluster's live nodes can run at once, with `cpus` CPUs and `gpus` GPUs each."""
    total = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        fits = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
        if gpus > 0:
            fits = min(fits, math.floor(resources.get("GPU", 0) / gpus + 1e-9))
        total += fits
    if total == 0:
        cluster = ray.cluster_resources()
        raise ConfigError(
            f"each unit asks Ray for {cpus} CPUs and {gpus:g} GPUs, more than any node of the cluster has "
            f"({cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs in all); "
            "lower --cpus-per-unit or --gpus-per-unit"
        )
    return total


def _train_on_ray(
    ray: Any,
    folder: RunFolder,
    plan: RunPlan,
    hardware: Hardware,
    units: list[Unit],
    gpus: float,
    on_outcome: Callable[[UnitOutcome], None] | None,
) -> None:
    """Hand the units to a pool of actors, one unit per idle actor, until every unit has ended."""
    cpus = hardware.threads
    worker = ray.remote(UnitWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0, max_task_retries=0)
    new_actor = lambda: worker.remote(str(folder.path), plan, hardware)  # noqa: E731
    queue = deque(units)
    actors = [new_actor() for _ in range(min(len(units), _capacity(ray, cpus, gpus)))]
    running: dict[Any, tuple[Any, Unit]] = {}

    def submit(actor: Any) -> None:
        if queue:
            unit = queue.popleft()
            running[actor.train.remote(unit)] = (actor, unit)

    try:
        for actor in actors:
            submit(actor)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, unit = running.pop(ref)
            try:
                outcome = dataclasses.replace(ray.get(ref), unit=unit)  # the driver's own Unit
            except ray.exceptions.RayTaskError as exc:  # raised by train_unit: stops the run, as locally
                cause = exc.cause
                raise (cause if isinstance(cause, CnnlabError) else exc) from None
            except ray.exceptions.RayError as exc:  # the actor died (killed, out of memory, node lost)
                outcome = _worker_died(folder, plan, unit, exc)
                actors.remove(actor)
                ray.kill(actor, no_restart=True)
                actor = new_actor()
                actors.append(actor)
            if on_outcome is not None:
                on_outcome(outcome)
            submit(actor)
    except BaseException:  # Ctrl-C, an error raised by a worker or by on_outcome: stop every actor
        _stop(ray, actors, list(running))
        raise


def _stop(ray: Any, actors: list[Any], running: list[Any]) -> None:
    """Kill the actors and wait (a while) for their units to end, so nothing writes into the folder after."""
    try:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if running:
            ray.wait(running, num_returns=len(running), timeout=STOP_SECONDS)
    except Exception:  # the instance itself may be going down (Ctrl-C in a terminal reaches it too)
        pass


def _worker_died(folder: RunFolder, plan: RunPlan, unit: Unit, exc: BaseException) -> UnitOutcome:
    """A unit whose worker died: recorded as failed with the reason (resume trains it again)."""
    status = folder.status(unit)
    if status.state == "finished":  # it died after writing the unit's results
        (result,) = [r for r in folder.results(plan) if r.arm == unit.arm.name and r.seed == unit.seed]
        return UnitOutcome(unit, "finished", metrics=result.metrics)
    message = f"the Ray worker training it died ({first_line(exc)})"
    folder.set_status(unit, UnitStatus("failed", status.epochs_done, message))
    return UnitOutcome(unit, "failed", message)

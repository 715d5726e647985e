"""The Ray backend (`--backend ray`): the same numbers as the local backend, resumable when killed,
failed units recorded while the others finish.

Tiny units on synthetic data, one CPU thread each, on the CPU in fp32 without compilation: the local
and the Ray backend then compute the same floats exactly. One Ray instance of 2 CPUs, started once,
serves the in-process test and the killed command line (which connects to it with --ray-address, so
Ray itself stops the killed driver's workers); the diverging sweep starts and stops its own instance,
as `cnnlab sweep --backend ray` does by default.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from cnnlab.api import execute, plan_sweep, prepare, prepare_resume
from cnnlab.cli import main
from cnnlab.runfolder import RunFolder, read_json
from cnnlab_cli import cnnlab_command
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

ray = pytest.importorskip("ray")

from cnnlab.ray_backend import run_units_on_ray  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings("ignore::cnnlab.errors.DataWarning")]

TINY_A = Path(__file__).parent / "fixtures" / "v0_1" / "tiny_a.toml"
# Timings differ between any two runs; every other number must not.
TIMING_KEYS = {"train_seconds", "val_seconds", "samples_per_second", "wall_seconds", "seconds_per_epoch",
               "train_gflops_per_second"}  # fmt: skip
CPUS = 2
EPOCHS = 4  # of the 8-unit sweep: room to kill a unit inside a later epoch


def write_sweep(folder: Path, data_dir: Path, *, grid: str, seeds: str, epochs: int, models: str) -> Path:
    path = folder / f"sweep-{len(list(folder.glob('sweep-*.toml')))}.toml"
    path.write_text(
        f"""models = {models}
seeds = {seeds}

[data]
dataset = "mnist"
data_dir = {json.dumps(str(data_dir))}
val_split = 0.1

[recipe]
epochs = {epochs}
batch_size = 32

[grid]
{grid}

[hardware]
device = "cpu"
precision = "fp32"
compile = "off"
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic data, the small spec and the two sweep files."""
    root = tmp_path_factory.mktemp("ray")
    write_dataset_folder(root / "data" / "mnist", learnable_arrays(train=1024, test=128))
    (root / "small.toml").write_text(SMALL_SPEC, encoding="utf-8")
    data, models = root / "data", json.dumps([str(root / "small.toml"), str(TINY_A)])
    # 2 models x 2 learning rates x 2 seeds: 8 units.
    sweep = write_sweep(root, data, grid="learning_rate = [1e-3, 3e-3]", seeds="2", epochs=EPOCHS, models=models)
    # One unit that diverges (sgd with a learning rate of 1e6 makes tiny_a's loss NaN), one that does not.
    grid = 'optimizer = ["sgd"]\nlearning_rate = [0.01, 1e6]'
    diverging = write_sweep(root, data, grid=grid, seeds="[0]", epochs=2, models=json.dumps([str(TINY_A)]))
    return {"root": root, "sweep": sweep, "diverging": diverging}


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray instance of 2 CPUs for the module; the tests' sweeps use it as it is."""
    ray.init(num_cpus=CPUS, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_run(files: dict[str, Path]) -> Path:
    """The sweep on the local backend, uninterrupted: the numbers every Ray run must reproduce."""
    prepared = prepare(plan_sweep(files["sweep"], threads=1), runs_dir=files["root"] / "local", name="local")
    outcome = execute(prepared)
    assert not outcome.failed and len(outcome.results) == 8
    return prepared.folder.path


def assert_same_numbers(run: Path, reference: Path) -> None:
    """Every unit of `run` is finished, with the history, metrics and weights of the same unit in `reference`."""
    folder, expected = RunFolder.open(run), RunFolder.open(reference)
    plan = folder.read_plan()
    assert len(plan.units()) == 8
    for unit in plan.units():
        assert folder.status(unit).state == "finished", unit.label
        for name in ("history.json", "metrics.json"):
            got, want = (read_json(f.unit_dir(unit) / name) for f in (folder, expected))
            strip = lambda d: {k: v for k, v in d.items() if k not in TIMING_KEYS}  # noqa: E731
            if name == "history.json":
                got, want = [strip(r) for r in got], [strip(r) for r in want]
            else:
                got, want = strip(got), strip(want)
            assert got == want, f"{unit.label}: {name} differs"
        got, want = folder.weights(unit), expected.weights(unit)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in got), f"{unit.label}: weights differ"


def test_a_sweep_on_ray_gives_the_local_backends_numbers_exactly(files, ray_address, local_run) -> None:
    prepared = prepare(plan_sweep(files["sweep"], threads=1), runs_dir=files["root"] / "ray", name="ray")
    seen = []
    outcome = run_units_on_ray(prepared.folder, prepared.plan, prepared.hardware, on_outcome=seen.append)

    assert not outcome.failed and len(outcome.results) == 8
    # The driver heard of every unit once, as its own Unit, with the metrics the worker wrote.
    assert sorted(o.unit.label for o in seen) == sorted(u.label for u in prepared.plan.units())
    assert all(o.state == "finished" and o.unit in prepared.plan.units() for o in seen)
    for o in seen:
        assert o.metrics == read_json(prepared.folder.unit_dir(o.unit) / "metrics.json")
        assert o.metrics["hardware"]["threads"] == 1
    assert_same_numbers(prepared.folder.path, local_run)
    assert ray.is_initialized()  # an instance the caller started is left to the caller


def killable(runs: Path, finished: int = 1) -> bool:
    """`finished` units have finished and another is inside a later epoch of its training, after a checkpoint."""
    if len(list(runs.glob("**/seed-*/metrics.json"))) < finished:
        return False
    for path in runs.glob("**/seed-*/status.json"):
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if status["state"] == "running" and 1 <= status["epochs_done"] <= EPOCHS - 2:
            return True
    return False


def test_a_killed_ray_sweep_resumes_on_the_local_backend_to_the_same_numbers(
    tmp_path, files, ray_address, local_run
) -> None:
    runs = tmp_path / "runs"
    args = ["sweep", str(files["sweep"]), "--backend", "ray", "--ray-address", ray_address, "--cpus-per-unit", "1",
            "--runs-dir", str(runs)]  # fmt: skip
    with open(tmp_path / "output.txt", "w") as output:
        driver = subprocess.Popen(cnnlab_command(*args), stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not killable(runs):
                assert driver.poll() is None, (tmp_path / "output.txt").read_text()
                assert time.monotonic() < deadline, "no unit finished while another was in its epochs in 120 s"
                time.sleep(0.02)
        finally:
            driver.kill()  # SIGKILL: the driver cleans up nothing
            driver.wait()
    # Ray stops a dead driver's workers: wait until their CPUs are free, so nothing writes any more.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) < CPUS:
        assert time.monotonic() < deadline, "the killed driver's Ray workers still hold their CPUs"
        time.sleep(0.1)
    (run,) = runs.iterdir()
    folder = RunFolder.open(run)
    statuses = [folder.status(unit) for unit in folder.read_plan().units()]
    assert any(s.state == "finished" for s in statuses)
    # A unit the killed worker was training, left "running" after a checkpoint: it continues from there.
    assert any(s.state == "interrupted" and s.epochs_done >= 1 for s in statuses), statuses

    # In this process (as `cnnlab sweep FILE --resume RUN --backend local` would run it): no second start-up.
    assert main(["sweep", str(files["sweep"]), "--resume", str(run), "--backend", "local"]) == 0
    assert_same_numbers(run, local_run)
    assert (run / "report.html").is_file()


def test_a_worker_killed_inside_a_unit_fails_that_unit_and_the_others_finish(files, ray_address, local_run) -> None:
    prepared = prepare(plan_sweep(files["sweep"], threads=1), runs_dir=files["root"] / "killed", name="killed")
    killed: list[str] = []

    def kill_a_training_worker() -> None:  # once a unit is inside a later epoch: SIGKILL its worker
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if killable(prepared.folder.path, finished=0):
                for pid, title in _processes():
                    # A worker of this process's Ray instance (worker -> raylet -> this process) running a unit.
                    if title.startswith("ray::UnitWorker.train") and _parent(_parent(pid)) == os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        killed.append(title)
                        return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_a_training_worker, daemon=True)
    watcher.start()
    seen = []
    outcome = run_units_on_ray(prepared.folder, prepared.plan, prepared.hardware, on_outcome=seen.append)
    watcher.join()

    assert killed, "no worker was killed: the units ended too soon"
    assert len(seen) == 8 and len(outcome.results) == 7
    ((unit, error),) = outcome.failed
    assert error.startswith("the Ray worker training it died")
    assert [o.error for o in seen if o.state == "failed"] == [error]
    assert prepared.folder.status(unit).state == "failed"
    # Resumed (here on the local backend), the failed unit continues from its last checkpoint.
    resumed = prepare_resume(prepared.folder.path)
    assert execute(resumed).failed == []
    assert_same_numbers(prepared.folder.path, local_run)


def test_a_diverging_unit_fails_on_ray_while_the_others_finish(tmp_path, files) -> None:
    runs = tmp_path / "runs"
    args = ["sweep", str(files["diverging"]), "--backend", "ray", "--cpus-per-unit", "1", "--runs-dir", str(runs)]
    # Its own Ray instance, in a process group of its own: whatever Ray left behind can be found.
    driver = subprocess.Popen(cnnlab_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = driver.communicate(timeout=180)
        deadline = time.monotonic() + 20
        while _group_members(driver.pid):
            assert time.monotonic() < deadline, f"Ray processes left running: {_group_members(driver.pid)}"
            time.sleep(0.2)
    finally:
        _kill_group(driver)

    assert driver.returncode == 1, stdout + stderr
    failed = "tiny_a@lr=1000000.0 seed 0"
    assert f"error: {failed} failed: FloatingPointError: training diverged" in stderr
    assert "Report: " in stdout  # the report, then the exit status
    (run,) = runs.iterdir()
    folder = RunFolder.open(run)
    states = {unit.label: folder.status(unit) for unit in folder.read_plan().units()}
    assert states.pop(failed).state == "failed"
    assert [s.state for s in states.values()] == ["finished"]  # the other learning rate
    report = (run / "report.html").read_text(encoding="utf-8")
    assert failed in report and "training diverged" in report


def _processes() -> list[tuple[int, str]]:
    """This user's processes, as (pid, title): Ray names a worker after the task it runs."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.stat().st_uid != os.getuid():
                continue
            title = cmdline.read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        found.append((int(cmdline.parent.name), title))
    return found


def _parent(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(text[text.rindex(")") + 2 :].split()[1])


def _group_members(pgid: int) -> list[str]:
    """The live processes of a process group, as 'pid name'."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        fields = text[name_end + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('(') + 1 : name_end]}")
    return members


def _kill_group(driver: subprocess.Popen) -> None:
    """SIGKILL what is left of the driver's process group (its own Ray instance), if anything."""
    try:
        os.killpg(driver.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    driver.wait()

"""cnnlab.callbacks against the real Keras callbacks: every scripted case of
tests/fixtures/keras_training/callbacks.json (written by make_callbacks_fixtures.py with Keras 3.15.1,
PyTorch backend) is replayed epoch by epoch and must reproduce Keras's decisions exactly: when
EarlyStopping stops, which weights it restores and when it takes them, each learning rate
ReduceLROnPlateau sets (to the float32 bit), each save of ModelCheckpoint(save_best_only=True), and
the counters behind them. A run interrupted after any epoch and resumed from `state_dict()` must
decide the same.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any

import pytest

from cnnlab.callbacks import BestTracker, EarlyStopper, PlateauScheduler, float32
from cnnlab.options import MONITORS, BestCheckpoint, EarlyStopping, ReduceLROnPlateau

FIXTURE = Path(__file__).parent / "fixtures" / "keras_training" / "callbacks.json"
DATA = json.loads(FIXTURE.read_text())
CASES = DATA["cases"]


def decode(value: Any) -> Any:
    if isinstance(value, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[value]
    return value


def cases(kind: str) -> list:
    return [pytest.param(case, id=case["name"]) for case in CASES if case["callback"] == kind]


def logs_for(monitor: str, value: float) -> dict[str, float]:
    """All four of cnnlab's metrics, the others set apart, so the monitor has to be the one read."""
    logs = {name: 1e9 * (i + 1) for i, name in enumerate(MONITORS)}
    logs[monitor] = value
    return logs


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (element-wise for lists)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a is None) is type(b is None)


def resumed(obj: Any, make: Any) -> Any:
    """A fresh callback loaded with a copy of `obj`'s state, as after a restart from a checkpoint."""
    fresh = make()
    fresh.load_state_dict(copy.deepcopy(obj.state_dict()))
    return fresh


# ---------------------------------------------------------------------------------------------
# Drivers: the engine's use of each class over a case's metric values, recorded as the fixture
# records Keras. `resume_after`: restart from state_dict after that epoch.


def run_early_stopping(case: dict, resume_after: int | None = None) -> dict:
    options = EarlyStopping(**case["options"])
    stopper = EarlyStopper(options)
    calls: list[int] = []
    record: dict[str, Any] = {"wait": [], "best": [], "best_epoch": [], "stop_epoch": None}
    epoch = -1
    for epoch, value in enumerate(map(decode, case["values"])):

        def weights(epoch: int = epoch) -> int:
            calls.append(epoch)
            return epoch  # the weights of an epoch: here, its number

        stop = stopper.on_epoch_end(epoch, logs_for(options.monitor, value), weights)
        record["wait"].append(stopper.wait)
        record["best"].append(stopper.best)
        record["best_epoch"].append(stopper.best_epoch)
        if epoch == resume_after:
            stopper = resumed(stopper, lambda: EarlyStopper(options))
        if stop:
            record["stop_epoch"] = epoch
            break
    restored = stopper.restore()
    record.update(
        epochs_run=epoch + 1,
        stopped_epoch=stopper.stopped_epoch,
        weights_calls=calls,
        final_weights_epoch=epoch if restored is None else restored,
    )
    return record


def run_plateau(case: dict, resume_after: int | None = None) -> dict:
    options = ReduceLROnPlateau(**case["options"])
    scheduler = PlateauScheduler(options)
    lr = case["initial_lr"]
    record: dict[str, list] = {"lr": [], "returned": [], "wait": [], "cooldown_counter": [], "best": []}
    for epoch, value in enumerate(map(decode, case["values"])):
        lr = scheduler.on_epoch_end(epoch, logs_for(options.monitor, value), lr)
        record["returned"].append(lr)
        record["lr"].append(float32(lr))  # what a float32 variable holding it would hold
        record["wait"].append(scheduler.wait)
        record["cooldown_counter"].append(scheduler.cooldown_counter)
        record["best"].append(scheduler.best)
        if epoch == resume_after:
            scheduler = resumed(scheduler, lambda: PlateauScheduler(options))
    return record


def run_best_checkpoint(case: dict, resume_after: int | None = None) -> dict:
    options = BestCheckpoint(**case["options"])
    tracker = BestTracker(options)
    record: dict[str, list] = {"saved": [], "best": [], "best_epoch": []}
    for epoch, value in enumerate(map(decode, case["values"])):
        record["saved"].append(tracker.on_epoch_end(epoch, logs_for(options.monitor, value)))
        record["best"].append(tracker.best)
        record["best_epoch"].append(tracker.best_epoch)
        if epoch == resume_after:
            tracker = resumed(tracker, lambda: BestTracker(options))
    return record


def check_early_stopping(case: dict, got: dict) -> None:
    keras = case["keras"]
    name = case["name"]
    assert got["stop_epoch"] == keras["stop_epoch"], f"{name}: stop epoch"
    assert got["epochs_run"] == keras["epochs_run"], f"{name}: epochs run"
    assert got["stopped_epoch"] == keras["stopped_epoch"], f"{name}: stopped_epoch"
    assert got["final_weights_epoch"] == keras["final_weights_epoch"], f"{name}: weights after training"
    assert got["wait"] == keras["wait"], f"{name}: wait per epoch"
    assert same(got["best"], [decode(v) for v in keras["best"]]), f"{name}: best per epoch"
    assert got["best_epoch"] == keras["best_epoch"], f"{name}: best_epoch per epoch"
    # Keras calls get_weights twice in the first monitored epoch (the same weights): cnnlab once.
    assert got["weights_calls"] == list(dict.fromkeys(keras["get_weights_epochs"])), f"{name}: weights() calls"


def check_plateau(case: dict, got: dict) -> None:
    keras = case["keras"]
    name = case["name"]
    assert float32(case["initial_lr"]) == keras["initial_lr_float32"], f"{name}: the initial rate as Keras holds it"
    assert got["lr"] == keras["lr"], f"{name}: learning rate per epoch (float32)"
    assert got["wait"] == keras["wait"], f"{name}: wait per epoch"
    assert got["cooldown_counter"] == keras["cooldown_counter"], f"{name}: cooldown per epoch"
    assert same(got["best"], [decode(v) for v in keras["best"]]), f"{name}: best per epoch"
    # Unchanged rates come back as given; changed ones are float32 values, as Keras stores them.
    previous = case["initial_lr"]
    for lr in got["returned"]:
        assert lr == previous or lr == float32(lr), f"{name}: a reduced rate that is not a float32 value"
        previous = lr


def check_best_checkpoint(case: dict, got: dict) -> None:
    keras = case["keras"]
    name = case["name"]
    assert got["saved"] == keras["saved"], f"{name}: saves per epoch"
    assert same(got["best"], [decode(v) for v in keras["best"]]), f"{name}: best per epoch"
    saved_epochs = [epoch for epoch, saved in enumerate(keras["saved"]) if saved]
    expected_best_epoch = [
        max((e for e in saved_epochs if e <= epoch), default=None) for epoch in range(len(keras["saved"]))
    ]
    assert got["best_epoch"] == expected_best_epoch, f"{name}: best_epoch per epoch"


RUNS = {
    "early_stopping": (run_early_stopping, check_early_stopping),
    "plateau": (run_plateau, check_plateau),
    "best_checkpoint": (run_best_checkpoint, check_best_checkpoint),
}


# ---------------------------------------------------------------------------------------------
# Keras's decisions


def test_fixture_is_from_keras_3_15_and_covers_the_options() -> None:
    assert DATA["keras_version"] == "3.15.1" and DATA["backend"] == "torch"
    kinds = [case["callback"] for case in CASES]
    assert kinds.count("early_stopping") >= 30 and kinds.count("plateau") >= 15 and kinds.count("best_checkpoint") >= 10
    used = {(case["callback"], key) for case in CASES for key in case["options"]}
    for cls, kind in (
        (EarlyStopping, "early_stopping"),
        (ReduceLROnPlateau, "plateau"),
        (BestCheckpoint, "best_checkpoint"),
    ):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= {key for k, key in used if k == kind}, f"{kind}: an option no case sets"


@pytest.mark.parametrize("case", cases("early_stopping"))
def test_early_stopping_decides_as_keras(case: dict) -> None:
    check_early_stopping(case, run_early_stopping(case))


@pytest.mark.parametrize("case", cases("plateau"))
def test_reduce_lr_on_plateau_sets_keras_learning_rates(case: dict) -> None:
    check_plateau(case, run_plateau(case))


@pytest.mark.parametrize("case", cases("best_checkpoint"))
def test_best_checkpoint_saves_when_keras_saves(case: dict) -> None:
    check_best_checkpoint(case, run_best_checkpoint(case))


def test_resumed_after_any_epoch_decides_as_keras() -> None:
    """Interrupted after each epoch in turn and resumed from `state_dict()`: still Keras's decisions."""
    resumes = 0
    for case in CASES:
        run, check = RUNS[case["callback"]]
        for epoch in range(len(case["values"])):
            check(case, run(case, resume_after=epoch))
            resumes += 1
    assert resumes > 500


def test_state_survives_a_checkpoint_file() -> None:
    """The states load back from the run folder's checkpoint format (torch.load, weights_only=True)
    with tensor weights, and the resumed callbacks decide as uninterrupted ones."""
    torch = pytest.importorskip("torch")
    options = EarlyStopping(patience=2, restore_best_weights=True, min_delta=0.01)
    values = [1.0, 0.5, math.nan, 0.48, 0.3, 0.31, 0.32, 0.33]
    straight, interrupted = EarlyStopper(options), EarlyStopper(options)
    plateau = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2)
    lr_straight = lr_interrupted = 0.001
    schedule_straight, schedule_interrupted = PlateauScheduler(plateau), PlateauScheduler(plateau)
    best_straight, best_interrupted = BestTracker(BestCheckpoint()), BestTracker(BestCheckpoint())
    for epoch, value in enumerate(values):
        logs = logs_for("val_loss", value)
        weights = lambda epoch=epoch: {"w": torch.full((2,), float(epoch))}
        stop = straight.on_epoch_end(epoch, logs, weights)
        assert interrupted.on_epoch_end(epoch, logs, weights) == stop
        lr_straight = schedule_straight.on_epoch_end(epoch, logs, lr_straight)
        lr_interrupted = schedule_interrupted.on_epoch_end(epoch, logs, lr_interrupted)
        assert lr_interrupted == lr_straight
        assert best_interrupted.on_epoch_end(epoch, logs) == best_straight.on_epoch_end(epoch, logs)
        buffer = io.BytesIO()
        torch.save(
            {
                "early": interrupted.state_dict(),
                "plateau": schedule_interrupted.state_dict(),
                "best": best_interrupted.state_dict(),
            },
            buffer,
        )
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        interrupted, schedule_interrupted = EarlyStopper(options), PlateauScheduler(plateau)
        best_interrupted = BestTracker(BestCheckpoint())
        interrupted.load_state_dict(state["early"])
        schedule_interrupted.load_state_dict(state["plateau"])
        best_interrupted.load_state_dict(state["best"])
        if stop:
            break
    assert straight.stopped and interrupted.stopped_epoch == straight.stopped_epoch == 6
    assert torch.equal(interrupted.restore()["w"], torch.full((2,), 4.0))
    assert lr_interrupted == lr_straight == float32(float32(float32(0.001) * 0.5) * 0.5)
    assert best_interrupted.best_epoch == best_straight.best_epoch == 4


# ---------------------------------------------------------------------------------------------
# Explanations and errors


def fixture_case(name: str) -> dict:
    return next(case for case in CASES if case["name"] == name)


def stopper_after(name: str) -> EarlyStopper:
    case = fixture_case(name)
    options = EarlyStopping(**case["options"])
    stopper = EarlyStopper(options)
    for epoch, value in enumerate(map(decode, case["values"])):
        if stopper.on_epoch_end(epoch, logs_for(options.monitor, value), lambda epoch=epoch: epoch):
            break
    return stopper


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "es_noisy_p3_restore",
            "val_loss did not improve for 3 epochs after epoch 7 (best 0.64); restoring the weights of epoch 7",
        ),
        ("es_noisy_delta0.01_p1", "val_loss did not improve by more than 0.01 for 1 epoch after epoch 2 (best 0.7)"),
        (
            "es_baseline_never_beaten_flat_p2",
            "val_loss did not improve on the baseline 0.4 in 2 epochs (stopped after epoch 2; best 0.5 at epoch 1); "
            "restoring the weights of epoch 1",
        ),
        (
            "es_val_accuracy_auto_p1_restore",
            "val_accuracy did not improve for 1 epoch after epoch 3 (best 0.8); restoring the weights of epoch 3",
        ),
        ("es_no_stop_restore", "no early stop: best 0.64 at epoch 7; restoring the weights of epoch 7"),
        ("es_no_stop_no_restore", "no early stop: best 0.64 at epoch 7"),
        ("es_never_monitored_restore", "no early stop: val_loss was not monitored (start_from_epoch 20)"),
    ],
)
def test_reason_explains_the_stop(name: str, text: str) -> None:
    assert stopper_after(name).reason() == text


def test_a_missing_monitor_is_an_error() -> None:
    logs = {"loss": 0.5, "accuracy": 0.9}
    with pytest.raises(ValueError, match="val_loss"):
        EarlyStopper(EarlyStopping()).on_epoch_end(0, logs, lambda: None)
    with pytest.raises(ValueError, match="val_loss"):
        EarlyStopper(EarlyStopping(start_from_epoch=5)).on_epoch_end(0, logs, lambda: None)
    with pytest.raises(ValueError, match="val_accuracy"):
        BestTracker(BestCheckpoint(monitor="val_accuracy")).on_epoch_end(0, logs)
    with pytest.raises(ValueError, match="val_loss"):
        PlateauScheduler(ReduceLROnPlateau()).on_epoch_end(0, logs, 0.001)


def test_a_state_of_another_monitor_is_refused() -> None:
    state = EarlyStopper(EarlyStopping(monitor="loss")).state_dict()
    with pytest.raises(ValueError, match="monitors 'loss'"):
        EarlyStopper(EarlyStopping()).load_state_dict(state)
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        PlateauScheduler(ReduceLROnPlateau(monitor="accuracy")).load_state_dict(
            PlateauScheduler(ReduceLROnPlateau()).state_dict()
        )
    with pytest.raises(ValueError, match="monitors 'val_loss'"):
        BestTracker(BestCheckpoint(monitor="loss")).load_state_dict(BestTracker(BestCheckpoint()).state_dict())

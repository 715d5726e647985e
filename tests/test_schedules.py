"""cnnlab's step-wise learning-rate schedules are Keras's: its own numbers (fixtures made by
`fixtures/keras_training/make_optim_fixtures.py`) and the edges that tell the formulas apart."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cnnlab.options import CosineDecay, ExponentialDecay, PiecewiseConstantDecay, ReduceLROnPlateau, option_from_dict
from cnnlab.schedules import learning_rate_at

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "keras_training" / "schedules.json").read_text())


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case["schedule"].items())


@pytest.mark.parametrize("case", FIXTURES["cases"], ids=case_id)
def test_matches_keras(case):
    schedule = option_from_dict(case["schedule"], "schedule", "fixture")
    for step, expected in zip(case["steps"], case["values"]):
        got = learning_rate_at(schedule, case["initial_learning_rate"], step)
        assert type(got) is float
        assert math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-300), f"step {step}: {got} != Keras {expected}"


def test_fixtures_cover_the_edges():
    """Each kind is evaluated around its boundaries and far beyond them, and the values change there
    (a schedule one step late would not match)."""
    kinds = {case["schedule"]["kind"] for case in FIXTURES["cases"]}
    assert kinds == {"exponential", "piecewise", "cosine"}
    for case in FIXTURES["cases"]:
        table = case["schedule"]
        edges = list(table.get("boundaries", [])) + [table.get("decay_steps", 0) + table.get("warmup_steps", 0)]
        assert {0, 1} <= set(case["steps"]) and max(case["steps"]) > max(edges)
        for edge in edges:
            assert {edge, edge + 1} <= set(case["steps"])
    cosine = [c for c in FIXTURES["cases"] if c["schedule"]["kind"] == "cosine"]
    assert any("warmup_target" in c["schedule"] for c in cosine) and any(c["schedule"].get("alpha") for c in cosine)
    assert any(c["schedule"].get("staircase") for c in FIXTURES["cases"])


def test_no_schedule_keeps_the_learning_rate():
    assert learning_rate_at(None, 0.003, 0) == learning_rate_at(None, 0.003, 10**6) == 0.003


def test_exponential_decay():
    smooth = ExponentialDecay(decay_steps=100, decay_rate=0.5)
    stairs = ExponentialDecay(decay_steps=100, decay_rate=0.5, staircase=True)
    assert learning_rate_at(smooth, 0.1, 0) == 0.1
    assert learning_rate_at(smooth, 0.1, 50) == pytest.approx(0.1 * 0.5**0.5, rel=1e-12)
    assert learning_rate_at(smooth, 0.1, 200) == pytest.approx(0.025, rel=1e-12)
    assert learning_rate_at(stairs, 0.1, 99) == 0.1  # the exponent floored: steps 0..99 share a value
    assert learning_rate_at(stairs, 0.1, 100) == 0.05


def test_piecewise_boundary_belongs_to_the_value_before_it():
    schedule = PiecewiseConstantDecay(boundaries=(10, 20), values=(1.0, 0.5, 0.1))
    got = [learning_rate_at(schedule, 123.0, step) for step in (0, 10, 11, 20, 21, 10**6)]
    assert got == [1.0, 1.0, 0.5, 0.5, 0.1, 0.1]  # and the recipe's learning rate is ignored


def test_cosine_decay_without_warmup():
    schedule = CosineDecay(decay_steps=100, alpha=0.1)
    assert learning_rate_at(schedule, 0.2, 0) == 0.2
    assert learning_rate_at(schedule, 0.2, 50) == pytest.approx(0.2 * (0.9 * 0.5 + 0.1), rel=1e-12)
    assert learning_rate_at(schedule, 0.2, 100) == pytest.approx(0.02, rel=1e-12)
    assert learning_rate_at(schedule, 0.2, 10**6) == learning_rate_at(schedule, 0.2, 100)  # stays at the end
    # warmup_steps without a warmup_target: Keras ignores them.
    ignored = CosineDecay(decay_steps=100, alpha=0.1, warmup_steps=30)
    assert [learning_rate_at(ignored, 0.2, s) for s in (0, 15, 99)] == [
        learning_rate_at(schedule, 0.2, s) for s in (0, 15, 99)
    ]


def test_cosine_warmup_goes_from_the_initial_rate_to_the_target_then_decays():
    schedule = CosineDecay(decay_steps=100, alpha=0.5, warmup_target=1.0, warmup_steps=10)
    assert learning_rate_at(schedule, 0.1, 0) == 0.1
    assert learning_rate_at(schedule, 0.1, 5) == pytest.approx(0.55, rel=1e-12)
    assert learning_rate_at(schedule, 0.1, 10) == 1.0  # the peak, then the cosine from it
    assert learning_rate_at(schedule, 0.1, 60) == pytest.approx(0.5 * 0.5 + 0.5, rel=1e-12)
    assert learning_rate_at(schedule, 0.1, 110) == pytest.approx(0.5, rel=1e-12)
    assert learning_rate_at(schedule, 0.1, 10**6) == pytest.approx(0.5, rel=1e-12)
    no_steps = CosineDecay(decay_steps=100, warmup_target=1.0)  # a target without warm-up steps: starts there
    assert learning_rate_at(no_steps, 0.1, 0) == 1.0


def test_refuses_what_is_not_a_schedule_of_the_step():
    with pytest.raises(TypeError):
        learning_rate_at(ReduceLROnPlateau(), 0.1, 0)
    with pytest.raises(ValueError):
        learning_rate_at(None, 0.1, -1)


def test_fast_and_without_torch():
    """Called on the host before every training step: microseconds, and torch is not imported."""
    schedule = CosineDecay(decay_steps=1000, alpha=0.1, warmup_target=0.01, warmup_steps=100)
    started = time.perf_counter()
    for step in range(10_000):
        learning_rate_at(schedule, 0.001, step)
    assert time.perf_counter() - started < 1.0  # about 10 ms; generous for a loaded machine
    code = "import sys, cnnlab.schedules; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0

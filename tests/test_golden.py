"""Golden numbers: what the default recipe trains to, against cnnlab 0.1 and against itself.

`fixtures/v0_1/golden_builtin.json` was written by cnnlab 0.1 (its README says how);
`fixtures/golden_builtin.json` by today's cnnlab, with the same command, once per kind of machine.
Floating-point results depend on the torch version, the thread count and the CPU: oneDNN and MKL
pick their kernels and blockings by the CPU model, not only by its instruction sets (an Intel Xeon
with AMX and a Zen 5 EPYC, both "AVX512" to PyTorch, give other fp32 numbers here). So each
test runs only on a machine whose kind is recorded and says why it skips elsewhere.

- Against itself, bit for bit: any change of the arithmetic shows. After an intended one, write
  this machine's numbers again with `CNNLAB_WRITE_GOLDEN=1 pytest tests/test_golden.py` (on a new
  kind of machine the same command adds its record), say why in the commit, and drop the records of
  kinds you could not rerun on: a record of numbers older than the code would fail there.
- Against 0.1, in fp32, within rounding: 0.2 changed how the CPU rounds (Adam in one fused pass,
  which adds Keras's epsilon after scaling it), not what it computes, once its dropout masks are
  drawn as 0.1 drew them (0.2's compact CPU masks are other random draws of the same distribution).
  In bf16 0.2 also changed what it computes (batch normalisation in float32, as Keras), and 2 epochs
  on 384 images are too chaotic in bf16 for a tolerance to mean anything, so bf16 is pinned against
  itself only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from cnnlab.api import plan_run, run
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab.runfolder import read_json
from synthetic import learnable_arrays, write_dataset_folder

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_0_1 = json.loads((FIXTURES / "v0_1" / "golden_builtin.json").read_text())
GOLDEN_PATH = FIXTURES / "golden_builtin.json"
WRITE = os.environ.get("CNNLAB_WRITE_GOLDEN") == "1"


def cpu_kind() -> str:
    """The CPU's vendor, family and model from /proc/cpuinfo (the model name alone is often generic
    in a virtual machine), or what `platform` says elsewhere."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return f"{fields.get('vendor_id', '?')} family {fields.get('cpu family', '?')} model {fields.get('model', '?')}"


# What the numbers depend on. cnnlab 0.1's file records the first three only: its comparison is
# within rounding, and holds on both CPU kinds recorded here.
HERE = {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    "cpu": cpu_kind(),
}
MODELS = ["convnet3", "convnet5", "convnet7"]
COMMAND = (
    "cnnlab compare --epochs 2 --limit-train 384 --limit-test 128 --precision P on "
    "tests/synthetic.learnable_arrays(512, 128, seed=0)"
)
HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
# fp32 with cnnlab 0.1's dropout masks (16 bits per element in NCHW order), which 0.2 draws more
# cheaply on the CPU (models.FastDropout): the run to compare with 0.1's numbers.
FP32_0_1_MASKS = "fp32, cnnlab 0.1's dropout masks"


def differences(record: dict) -> list[str]:
    """How this machine differs from a record's, in the keys the record has."""
    return [
        f"{key} {record[key]} (here {value})" for key, value in HERE.items() if key in record and record[key] != value
    ]


def skip_unless_recorded_here(record: dict) -> None:
    different = differences(record)
    if different or torch.cuda.is_available():
        pytest.skip(reason="golden numbers were recorded with " + ", ".join(different or ["no CUDA"]))


def record_of_this_kind(golden: dict) -> dict | None:
    """The golden record whose every key matches this machine's, if there is one."""
    return next((r for r in golden["machines"] if all(r.get(k) == v for k, v in HERE.items())), None)


def record_for_here(golden: dict) -> dict:
    """The golden record of this kind of machine; skips, naming the recorded kinds, where there is none."""
    record = record_of_this_kind(golden)
    if record is not None and not torch.cuda.is_available():
        return record
    kinds = "; ".join(", ".join(f"{key} {record[key]}" for key in HERE) for record in golden["machines"])
    here = ", ".join(f"{key} {value}" for key, value in HERE.items())
    pytest.skip(
        reason=f"golden numbers were recorded on {kinds}; here {here}{' with CUDA' if torch.cuda.is_available() else ''}"
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """`COMMAND`'s losses and accuracies, per precision (and `FP32_0_1_MASKS`) and model, trained once
    for all tests."""
    tmp_path = tmp_path_factory.mktemp("golden")
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(512, 128, seed=0))
    runs: dict[str, dict] = {}
    for arm in ("auto", "fp32", FP32_0_1_MASKS):
        plan = plan_run(
            MODELS,
            recipes=[Recipe(epochs=2)],
            data=DataSelection(data_dir=str(data), limit_train=384, limit_test=128),
            hardware=HardwareRequest(precision="fp32" if arm == FP32_0_1_MASKS else arm),
        )
        if arm == FP32_0_1_MASKS:
            plan = dataclasses.replace(plan, hardware=dataclasses.replace(plan.hardware, compact_dropout_masks=False))
        folder = run(plan, runs_dir=tmp_path / f"runs-{arm}").folder
        runs[arm] = {}
        for model in MODELS:
            metrics = read_json(folder.path / model / "seed-0" / "metrics.json")
            history = read_json(folder.path / model / "seed-0" / "history.json")
            runs[arm][model] = {
                "precision": metrics["hardware"]["precision"],
                "history": [{k: r[k] for k in HISTORY_KEYS} for r in history],
                "test_loss": metrics["test_loss"],
                "test_accuracy": metrics["test_accuracy"],
            }
    return runs


def numbers(entry: dict) -> list[float]:
    return [r[k] for r in entry["history"] for k in HISTORY_KEYS] + [entry["test_loss"], entry["test_accuracy"]]


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_default_recipe_trains_to_its_golden_numbers_bit_for_bit(precision, request):
    # The skip is decided before `trained` trains anything (the fixture is asked for afterwards).
    if WRITE:
        trained = request.getfixturevalue("trained")
        golden = json.loads(GOLDEN_PATH.read_text()) if GOLDEN_PATH.exists() else {"made_with": COMMAND, "machines": []}
        record = record_of_this_kind(golden)
        if record is None:
            record = {**HERE, "runs": {}}
            golden["machines"].append(record)
        record["runs"][precision] = trained[precision]
        GOLDEN_PATH.write_text(json.dumps(golden, indent=1) + "\n")
        pytest.skip(reason=f"wrote {GOLDEN_PATH.name}'s {precision} numbers for {HERE['cpu']}")
    record = record_for_here(json.loads(GOLDEN_PATH.read_text()))
    trained = request.getfixturevalue("trained")
    for model in MODELS:
        assert trained[precision][model] == record["runs"][precision][model], model


def test_fp32_trains_as_cnnlab_0_1_did_within_rounding(request):
    skip_unless_recorded_here(GOLDEN_0_1)
    trained = request.getfixturevalue("trained")
    for model in MODELS:
        ours, theirs = trained[FP32_0_1_MASKS][model], GOLDEN_0_1["runs"]["fp32"][model]
        assert ours["precision"] == theirs["precision"] == "fp32"
        # Measured: at most 1.1e-4 relative after 2 epochs; accuracies equal.
        assert numbers(ours) == pytest.approx(numbers(theirs), rel=1e-3, abs=1e-6), model

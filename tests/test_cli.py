"""The command line as a user types it: help, listings, errors as one line, and whole runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

import cnnlab
from cnnlab import api
from cnnlab.cli import main
from cnnlab.config import DataSelection, HardwareRequest, Recipe
from cnnlab_cli import cnnlab_command, run_cnnlab
from synthetic import SMALL_SPEC, learnable_arrays, write_dataset_folder

COMMANDS = [
    "models",
    "summary",
    "convert",
    "datasets",
    "train",
    "compare",
    "sweep",
    "evaluate",
    "report",
    "runs",
    "predict",
    "export",
    "serve",
]


def test_console_script_help_and_version():
    """The installed `cnnlab` script itself, exactly as a shell runs it."""
    script = str(Path(sys.executable).with_name("cnnlab"))
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"cnnlab {cnnlab.__version__}"


class _Planned(Exception):
    """Raised by the stand-in for `api.prepare`: the plan was made, nothing is trained."""


@pytest.fixture()
def captured_plan(monkeypatch):
    """The plan the CLI hands to the library (`api.prepare`), captured before any data is loaded."""
    plans = []
    monkeypatch.delenv("CNNLAB_DATA_DIR", raising=False)

    def prepare(plan, **kwargs):
        plans.append((plan, kwargs))
        raise _Planned

    monkeypatch.setattr(api, "prepare", prepare)
    return plans


def test_cli_defaults_are_the_notebooks_recipe(captured_plan):
    with pytest.raises(_Planned):
        main(["compare"])
    ((plan, kwargs),) = captured_plan
    assert [arm.name for arm in plan.arms] == ["convnet3", "convnet5", "convnet7"]
    assert {arm.recipe for arm in plan.arms} == {Recipe()}
    assert plan.seeds == (0,) and plan.data == DataSelection() and plan.hardware_request == HardwareRequest()
    assert kwargs["runs_dir"] == Path("runs") and kwargs["name"] == "compare"


def test_cli_options_reach_the_plan_by_keyword(captured_plan, tmp_path):
    with pytest.raises(_Planned):
        main(
            [
                "train",
                "convnet7",
                "--epochs",
                "3",
                "--batch-size",
                "64",
                "--lr",
                "0.003",
                "--seeds",
                "2,5",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                str(tmp_path),
                "--limit-train",
                "100",
                "--limit-test",
                "50",
                "--val-split",
                "0.1",
                "--device",
                "cpu",
                "--precision",
                "fp32",
                "--compile",
                "off",
                "--runs-dir",
                str(tmp_path / "r"),
            ]
        )
    ((plan, kwargs),) = captured_plan
    assert plan.arms[0].recipe == Recipe(epochs=3, batch_size=64, learning_rate=0.003)
    assert plan.seeds == (2, 5)
    assert plan.data == DataSelection("fashion-mnist", str(tmp_path), 100, 50, 0.1)
    assert plan.hardware_request == HardwareRequest("cpu", "fp32", "off")
    assert plan.hardware.precision == "fp32" and plan.hardware.device == "cpu"
    assert kwargs["runs_dir"] == tmp_path / "r" and kwargs["name"] == "convnet7"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage" in out and "--debug" in out


@pytest.mark.parametrize("command", ["train", "compare"])
def test_help_labels_bf16_accuracy_unverified(command, capsys):
    """Until paired equivalence tests resolve, the fast default's accuracy is labelled unverified."""
    assert main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())  # the help's box unwrapped
    assert "bf16's accuracy against fp32 is unverified" in out
    assert "fp32 for numbers to publish" in out


def test_models_lists_the_zoo(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, params in (("convnet3", "4,060,426"), ("convnet5", "1,083,918"), ("convnet7", "379,014")):
        assert name in out and params in out


def test_models_show_prints_an_editable_spec(capsys):
    assert main(["models", "--show", "convnet7"]) == 0
    spec = tomllib.loads(capsys.readouterr().out)
    assert spec["name"] == "convnet7" and len(spec["layers"]) == 25


def test_summary_of_convnet5(capsys):
    assert main(["summary", "convnet5"]) == 0
    out = capsys.readouterr().out
    assert "conv2d_5 (Conv2D)" in out and "(None, 3, 3, 164)" in out and "524,964" in out
    assert "Total params: 1,083,918" in out and "Trainable params: 1,083,406" in out
    assert "Non-trainable params: 512" in out


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    err = "\n".join(lines)
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return err


def test_bad_spec_is_one_line_naming_file_layer_field(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text('input_shape = [28, 28, 1]\n[[layers]]\ntype = "Dropout"\nrate = 1.5\n')
    assert main(["summary", str(spec)]) == 2
    err = one_error_line(capsys)
    assert err.startswith("error: ") and str(spec) in err and "layer 1 (Dropout)" in err and "'rate'" in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["summary", "nonexistent_model", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_unknown_model_and_dataset(capsys, tmp_path):
    assert main(["train", "convnet9"]) == 2
    assert "unknown model 'convnet9'" in one_error_line(capsys)
    assert (
        main(
            [
                "train",
                "convnet7",
                "--dataset",
                "cifar10",
                "--data-dir",
                str(tmp_path),
                "--runs-dir",
                str(tmp_path / "runs"),
            ]
        )
        == 2
    )
    assert "cifar10" in one_error_line(capsys)


def test_missing_data_names_the_file_and_the_fix(tmp_path, capsys):
    assert main(["train", "convnet7", "--data-dir", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = one_error_line(capsys)
    assert str(tmp_path / "mnist") in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path):
    assert main(["train", "convnet7", "--device", "cuda", "--runs-dir", str(tmp_path)]) == 2
    assert "no CUDA GPU" in one_error_line(capsys)


def test_unwritable_runs_dir(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(64, 32))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["train", "convnet7", "--data-dir", str(data), "--runs-dir", str(blocker / "runs"), "--epochs", "1"])
    assert code == 2
    err = one_error_line(capsys)
    assert "cannot create a run folder" in err and "--runs-dir" in err


def test_bad_seeds_option(capsys):
    assert main(["compare", "--seeds", "a,b"]) == 2
    assert "--seeds" in one_error_line(capsys)


def test_train_evaluate_report_on_generated_data(tmp_path):
    """A whole run on tiny generated IDX files, through the console script, as a user types it."""
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(512, 128))
    spec = tmp_path / "small.toml"
    spec.write_text(SMALL_SPEC)
    result = run_cnnlab(
        "train",
        str(spec),
        "--data-dir",
        str(data),
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--format",
        "svg",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "checksums" in result.stderr  # generated files are not the canonical ones: one warning
    assert "small epoch 3/3" in result.stdout and "Test acc" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.endswith("-small")
    for name in (
        "config.toml",
        "environment.json",
        "comparison.md",
        "comparison.csv",
        "comparison.json",
        "loss_small.svg",
        "accuracy_small.svg",
        "curves_all.svg",
        "small/spec.toml",
        "small/seed-0/history.csv",
        "small/seed-0/history.json",
        "small/seed-0/metrics.json",
        "small/seed-0/weights.pt",
    ):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "small/seed-0/checkpoint.pt").exists()
    metrics = json.loads((run_dir / "small/seed-0/metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.9 and metrics["epochs"] == 3
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["format_version"] == 2 and config["arms"][0]["recipe"]["epochs"] == 3
    assert [arm["name"] for arm in config["arms"]] == ["small"]
    assert config["hardware"]["device"] == "cpu"  # the resolved hardware, recorded once for the run
    assert json.loads((run_dir / "small/seed-0/status.json").read_text())["state"] == "finished"
    environment = json.loads((run_dir / "environment.json").read_text())
    assert environment["torch"] and environment["torch_threads"] >= 1

    evaluated = run_cnnlab("evaluate", str(run_dir), "--data-dir", str(data))
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{metrics['test_accuracy']:.4f}" in evaluated.stdout

    (run_dir / "comparison.md").unlink()
    reported = run_cnnlab("report", str(run_dir), "--format", "svg")
    assert reported.returncode == 0, reported.stderr
    assert (run_dir / "comparison.md").is_file()


def test_units_at_once_trains_the_same_units_and_is_recorded(tmp_path):
    """`--units-at-once 2`: two seeds trained together, taking turns, as a user types it: each unit's
    history and test accuracy are those of the one-at-a-time run, and the run folder records the
    choice (a resume keeps it)."""
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(256, 64))
    spec = tmp_path / "small.toml"
    spec.write_text(SMALL_SPEC)
    histories = {}
    for at_once in ("1", "2"):
        runs = tmp_path / f"runs-{at_once}"
        result = run_cnnlab("compare", str(spec), "--seeds", "2", "--epochs", "2", "--data-dir", str(data),
                            "--units-at-once", at_once, "--runs-dir", str(runs), "--format", "svg", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        (run_dir,) = runs.iterdir()
        assert tomllib.loads((run_dir / "config.toml").read_text())["hardware"]["units_at_once"] == int(at_once)
        histories[at_once] = [json.loads((run_dir / f"small/seed-{s}/history.json").read_text()) for s in (0, 1)]
        histories[at_once] = [[{k: v for k, v in r.items() if "seconds" not in k and k != "samples_per_second"}
                               for r in h] for h in histories[at_once]]  # fmt: skip
    assert histories["1"] == histories["2"] and histories["1"][0] != histories["1"][1]
    with pytest.warns(UserWarning, match="canonical checksums"):  # generated IDX files, as above
        assert api.prepare_resume(run_dir, data_dir=data).hardware.units_at_once == 2
    refused = run_cnnlab("compare", str(spec), "--units-at-once", "0", "--data-dir", str(data), cwd=tmp_path)
    assert refused.returncode != 0 and "--units-at-once must be an integer >= 1, got 0" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_convert_keras_json_to_toml(tmp_path, capsys):
    source = Path(__file__).parent / "fixtures" / "keras" / "seed_convnet7_keras3.json"
    target = tmp_path / "convnet7.toml"
    assert main(["convert", str(source), "-o", str(target)]) == 0
    assert main(["summary", str(target)]) == 0
    out = capsys.readouterr().out
    assert "Total params: 379,014" in out and "Non-trainable params: 1,064" in out


def test_unsupported_keras_layer_is_named(tmp_path, capsys):
    source = json.loads((Path(__file__).parent / "fixtures" / "keras" / "seed_convnet7_keras3.json").read_text())
    source["config"]["layers"][2]["class_name"] = "LSTM"
    path = tmp_path / "lstm.json"
    path.write_text(json.dumps(source))
    assert main(["summary", str(path)]) == 2
    err = one_error_line(capsys)
    assert str(path) in err and "LSTM" in err


@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_stop_cleanly_and_name_the_partial_run(tmp_path, stop, code):
    """Ctrl-C, or a scheduler's SIGTERM: the resume hint, the unit marked interrupted, nothing half-written.

    The child starts with SIGINT at its default, whatever this test process inherited (a background
    shell starts its jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt)."""
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(512, 64))
    env = {k: v for k, v in os.environ.items() if k not in ("CNNLAB_DATA_DIR", "CNNLAB_DEBUG")}
    process = subprocess.Popen(
        cnnlab_command(
            "train", "convnet7", "--data-dir", str(data), "--epochs", "200", "--runs-dir", str(tmp_path / "runs")
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs").glob("*/convnet7/seed-0/checkpoint.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.2)
    process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert f"The partial run is in {run_dir}" in err and f"--resume {run_dir}" in err
    assert "Traceback" not in err
    assert not list(run_dir.rglob("*.tmp"))  # nothing half-written
    assert not (run_dir / "convnet7" / "seed-0" / "metrics.json").exists()
    status = json.loads((run_dir / "convnet7" / "seed-0" / "status.json").read_text())
    assert status["state"] == "interrupted" and status["epochs_done"] >= 1


def test_a_keras_json_model_trains(tmp_path, capsys):
    """A Keras-written model cnnlab has never seen (20 outputs, strided 'same' pooling) trains as is."""
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(256, 64))
    source = Path(__file__).parent / "fixtures" / "keras" / "pooling_variants20_keras3.json"
    assert (
        main(["train", str(source), "--data-dir", str(data), "--epochs", "1", "--runs-dir", str(tmp_path / "runs")])
        == 0
    )
    assert list((tmp_path / "runs").glob("*/*/seed-0/metrics.json"))


def test_a_model_with_too_few_outputs_is_refused(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset_folder(data / "mnist", learnable_arrays(64, 32))
    spec = tmp_path / "five.toml"
    spec.write_text('input_shape = [28, 28, 1]\n[[layers]]\ntype = "Flatten"\n[[layers]]\ntype = "Dense"\nunits = 5\n')
    assert main(["train", str(spec), "--data-dir", str(data), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "5 outputs but mnist has 10 classes" in one_error_line(capsys)
    assert not (tmp_path / "runs").exists()  # refused before anything was written

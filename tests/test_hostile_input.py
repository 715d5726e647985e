"""Hostile and damaged input: one clear line, exit 2, no traceback, and nothing written where the
user did not point. Each class of input is parametrised over many cases of its kind."""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import pytest
import torch

from cnnlab.cli import main
from cnnlab.runfolder import RunFolder
from synthetic import learnable_arrays, write_dataset_folder

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"
TINY_SPEC = (FIXTURES / "tiny_a.toml").read_text()


class Result:
    """What `cnnlab ARGS` did, run in this process (faster than a fresh one per case)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture()
def cnnlab(capsys, monkeypatch):
    def run(*args: str, cwd: Path | None = None) -> Result:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """The synthetic data the 0.1 fixture folders were trained on."""
    root = tmp_path_factory.mktemp("data")
    write_dataset_folder(root / "mnist", learnable_arrays(512, 128, seed=0))
    return root


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


# ---------------------------------------------------------------------------------------------
# No name read from an input chooses a path


HOSTILE_NAMES = [
    "../../etc/x",
    "/tmp/absolute",
    "..",
    "a/b",
    "x" * 300,
    "<script>alert(1)</script>",
    "[bold red]markup[/]",
    "a|b",
    "résumé ünïcode",
    "con",
    "comparison.md",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_spec_name_never_chooses_a_path(name, tmp_path, data_dir, cnnlab):
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY_SPEC.replace('name = "tiny_a"', f"name = {json.dumps(name)}"))
    runs = tmp_path / "sandbox" / "runs"
    before = files_under(tmp_path)
    result = cnnlab(
        "train",
        str(spec),
        "--data-dir",
        str(data_dir),
        "--epochs",
        "1",
        "--limit-train",
        "64",
        "--runs-dir",
        str(runs),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    written = files_under(tmp_path) - before
    assert all(runs in p.parents for p in written if p != runs and p != runs.parent), sorted(written)
    (run_dir,) = runs.iterdir()
    (unit_metrics,) = run_dir.glob("*/seed-0/metrics.json")
    arm_folder = unit_metrics.parent.parent
    assert arm_folder.parent == run_dir and len(arm_folder.name) <= 64
    assert json.loads(unit_metrics.read_text())["model"] == name  # the original name is kept for display
    page = (run_dir / "report.html").read_text()
    assert html.escape(name) in page
    assert "<script>alert" not in page
    assert name in result.stdout.replace("\n", "") or name[:20] in result.stdout  # shown, not interpreted


@pytest.mark.parametrize("name", ["nul\u0000byte", "bell\u0007", "escape\u001b[31mred", "zero\u200bwidth"])
def test_control_characters_in_a_name_are_refused_before_anything_is_written(name, tmp_path, data_dir, cnnlab):
    spec = tmp_path / "spec.toml"
    spec.write_text(TINY_SPEC.replace('name = "tiny_a"', f"name = {json.dumps(name)}"))
    result = cnnlab("train", str(spec), "--data-dir", str(data_dir), "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 2
    assert "must not contain control characters" in one_error_line(result)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Damaged run folders


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _wrong_shape(path: Path) -> None:
    other = torch.load(path.parents[2] / "tiny_b" / "seed-0" / "weights.pt", weights_only=True)
    torch.save(other, path)


def _not_a_state_dict(path: Path) -> None:
    torch.save([1, 2, 3], path)


def _drop_keys(path: Path) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("test_accuracy", "params")}))


WEIGHTS = "tiny_a/seed-0/weights.pt"
DAMAGES = {
    "empty weights": (WEIGHTS, lambda p: p.write_bytes(b"")),
    "truncated weights": (WEIGHTS, _truncate),
    "garbage weights": (WEIGHTS, lambda p: p.write_bytes(b"\x00garbage" * 50)),
    "wrong-shape weights": (WEIGHTS, _wrong_shape),
    "weights not a state dict": (WEIGHTS, _not_a_state_dict),
    "weights a folder": (WEIGHTS, lambda p: (p.unlink(), p.mkdir())),
    "metrics missing keys": ("tiny_a/seed-1/metrics.json", _drop_keys),
    "metrics not JSON": ("tiny_a/seed-1/metrics.json", lambda p: p.write_text("{nope")),
    "history not epochs": ("tiny_b/seed-0/history.json", lambda p: p.write_text('[{"bogus": 1}]')),
    "predictions garbage": ("tiny_b/seed-1/predictions.pt", lambda p: p.write_bytes(b"PK\x03\x04broken")),
    "predictions without keys": ("tiny_b/seed-1/predictions.pt", lambda p: torch.save({"labels": 1}, p)),
    "unknown config key": ("config.toml", lambda p: p.write_text(p.read_text() + "bogus = 1\n")),
    "unknown recipe key": ("config.toml", lambda p: p.write_text(p.read_text() + "bogus = 1\n")),
    "config not TOML": ("config.toml", lambda p: p.write_text("[[[")),
    "spec damaged": ("tiny_b/spec.toml", lambda p: p.write_text("layers = 3")),
}


@pytest.mark.parametrize("command", ["evaluate", "report", "resume"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_run_folders_give_one_line_naming_the_file(damage, command, tmp_path, data_dir, cnnlab):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "finished", run)
    relative, break_it = DAMAGES[damage]
    if damage == "unknown recipe key":
        config = (run / "config.toml").read_text().replace("[train]\n", "[train]\nbogus = 1\n")
        (run / "config.toml").write_text(config)
    else:
        break_it(run / relative)
    args = {
        "evaluate": ["evaluate", str(run), "--data-dir", str(data_dir)],
        "report": ["report", str(run)],
        "resume": ["compare", "--resume", str(run), "--data-dir", str(data_dir)],
    }[command]
    result = cnnlab(*args)
    needs = {
        "evaluate": ("weights", "config", "spec"),
        "report": ("metrics", "history", "predictions", "config", "spec"),
        "resume": ("config", "spec", "metrics"),
    }
    if not any(word in damage for word in needs[command]) and result.returncode == 0:
        return  # this command does not read the damaged file: it must simply work
    assert result.returncode == 2, result.stdout + result.stderr
    line = one_error_line(result)
    assert str(run / relative.split("/")[0]) in line or "config.toml" in line


@pytest.mark.parametrize("command", [["evaluate"], ["report"], ["compare", "--resume"]])
def test_a_path_that_is_not_a_run_folder(command, tmp_path, cnnlab):
    (tmp_path / "file.txt").write_text("hello")
    for target, message in (
        (tmp_path / "file.txt", "is not a folder"),
        (tmp_path / "missing", "does not exist"),
        (tmp_path, "config.toml is missing"),
    ):
        result = cnnlab(*command, str(target))
        assert result.returncode == 2
        assert message in one_error_line(result)


CHECKPOINT_DAMAGES = {
    "garbage": lambda p: p.write_bytes(b"not a checkpoint"),
    "empty": lambda p: p.write_bytes(b""),
    "missing keys": lambda p: torch.save({"model": {}}, p),
    "another model's": lambda p: torch.save(
        {**torch.load(p, weights_only=True), "model": {"layers.0.weight": torch.zeros(3)}}, p
    ),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGES))
def test_a_damaged_checkpoint_stops_resume_with_one_line(damage, tmp_path, data_dir, cnnlab):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "interrupted", run)
    checkpoint = run / "tiny_b" / "seed-1" / "checkpoint.pt"
    CHECKPOINT_DAMAGES[damage](checkpoint)
    result = cnnlab("compare", "--resume", str(run), "--data-dir", str(data_dir))
    assert result.returncode == 2, result.stderr
    line = one_error_line(result)
    assert str(checkpoint) in line and "delete it" in line
    folder = RunFolder.open(run)
    assert folder.status(folder.read_plan().units()[-1]).state == "interrupted"  # left as it was


def test_resume_into_an_unwritable_folder_fails_before_training(tmp_path, data_dir, monkeypatch):
    """Checked before any epoch (as root, permissions do not stop writes: the probe is made to fail)."""
    from cnnlab import api

    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "interrupted", run)
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-check"):
            raise PermissionError(13, "Permission denied")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    trained = []
    monkeypatch.setattr(api, "execute", lambda *a, **k: trained.append(1))
    with pytest.raises(Exception, match="cannot write into .*Permission denied; make it writable"):
        api.resume(run, data_dir=data_dir)
    assert trained == []


# ---------------------------------------------------------------------------------------------
# Refused before anything is written


@pytest.mark.parametrize(
    "args, message",
    [
        (["--val-split", "0.999", "--limit-train", "10"], "--val-split 0.999 leaves 10 of 10"),
        (["--val-split", "0.01", "--limit-train", "10"], "--val-split 0.01 leaves 0 of 10"),
        (["--epochs", "0"], "--epochs 0 trains nothing: it tests the weights of --init-from FILE"),
        (["--epochs", "-1"], "--epochs must be an integer >= 0"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
        (["--seed", "-5"], "seeds must be non-negative"),
        (["--format", "jpg"], "--format must be png or svg"),
        (["--precision", "fp8"], "--precision must be auto, fp32 or bf16"),
        (["--limit-test", "0"], "--limit-test must be an integer >= 1"),
        (["--units-at-once", "0"], "--units-at-once must be an integer >= 1, got 0"),
        (["--gpus-per-unit", "1"], "--ray-address and --gpus-per-unit need --backend ray"),
        (["--backend", "ray", "--units-at-once", "2"], "--units-at-once is the local backend's"),
        (["--backend", "slurm"], "--backend must be local or ray"),
    ],
)
def test_bad_options_are_refused_before_a_run_folder_exists(args, message, tmp_path, data_dir, cnnlab):
    result = cnnlab(
        "compare",
        str(FIXTURES / "tiny_a.toml"),
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
        *args,
    )
    assert result.returncode == 2
    assert message in one_error_line(result)
    assert not (tmp_path / "runs").exists()


def test_two_models_with_one_name_are_refused_before_a_run_folder_exists(tmp_path, data_dir, cnnlab):
    copy = tmp_path / "copy.toml"
    copy.write_text(TINY_SPEC)
    result = cnnlab(
        "compare",
        str(FIXTURES / "tiny_a.toml"),
        str(copy),
        "--data-dir",
        str(data_dir),
        "--runs-dir",
        str(tmp_path / "runs"),
    )
    assert result.returncode == 2
    assert "two models are named 'tiny_a'" in one_error_line(result)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("image_format", ["jpg", "bogus", "PNG"])
def test_report_checks_the_format_before_writing_anything(image_format, tmp_path, cnnlab):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "finished", run)
    before = files_under(run)
    result = cnnlab("report", str(run), "--format", image_format)
    assert result.returncode == 2
    assert "--format must be png or svg" in one_error_line(result)
    assert files_under(run) == before


def test_convert_write_errors_do_not_mention_runs_dir(tmp_path, cnnlab):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = cnnlab("convert", "convnet7", "-o", str(blocker / "out.toml"))
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(blocker / "out.toml") in line and "--runs-dir" not in line

"""Everything a finished run shows a person: the table, the pairwise verdicts, the figures and the report.

`finish_run` works from the run folder alone (no dataset needed) and writes into it:

    comparison.{md,csv,json}           the table and the verdicts (tables.py)
    loss_<model>, accuracy_<model>, curves_all          learning curves (plots.py)
    confusion_<model>, mistakes_<model>                 confusion matrix, most confident mistakes
    report.html                        one self-contained page: every figure embedded as a data: URI
    report.md                          the same in Markdown, linking the figure files beside it
"""

from __future__ import annotations

import base64
import html
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from cnnlab.datasets import DATASETS
from cnnlab.engine import TrainConfig
from cnnlab.errors import RunError
from cnnlab.models import builtin_models, builtin_spec_text, format_flops, summarize
from cnnlab.plots import confusion_figure, mistakes_figure, write_plots
from cnnlab.runs import UnitResult, load_units, read_config, read_json, read_spec, unit_dir, write_text
from cnnlab.spec import ModelSpec, parse_spec, tomllib  # tomllib, or tomli on Python 3.10
from cnnlab.stats import Comparison, ModelStats, model_stats, pairwise
from cnnlab.tables import columns, format_duration, markdown_table, table_rows, write_tables


@dataclass
class RunSummary:
    """What `finish_run` computed, for the CLI to print."""

    rows: list[ModelStats]
    comparisons: list[Comparison]
    files: list[Path]

    @property
    def report(self) -> Path | None:
        """The HTML report among the files written."""
        return next((f for f in self.files if f.name == "report.html"), None)


@dataclass
class Mistakes:
    """The test images one model/seed got wrong with the highest confidence (from mistakes.pt)."""

    seed: int
    images: np.ndarray          # uint8, (N, H, W) or (N, H, W, C)
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray


@dataclass
class ModelDetails:
    """What the report shows of one model beyond the comparison table."""

    name: str
    units: list[UnitResult]
    forward_flops: int | None       # per sample; None when the spec cannot be rebuilt
    training_flops: int | None
    confusion: np.ndarray           # (classes, classes) counts summed over seeds; rows are true classes
    mistakes: Mistakes | None       # of the first seed that recorded them
    figures: dict[str, Path]        # loss, accuracy, confusion, mistakes

    @property
    def seeds(self) -> list[int]:
        return [u.seed for u in self.units]

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Accuracy on each true class; over several seeds, the mean (each seed sees the same images)."""
        totals = self.confusion.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(totals > 0, np.diag(self.confusion) / totals, np.nan)

    def mean_metric(self, key: str) -> float:
        return float(np.mean([u.metrics[key] for u in self.units]))


def finish_run(run_dir: Path, image_format: str = "png") -> RunSummary:
    """Write the tables, figures, report.html and report.md of a run folder from its finished results."""
    units: list[UnitResult] = load_units(run_dir)
    if not units:
        raise RunError(f"{run_dir} has no finished model yet; resume it with `cnnlab compare --resume {run_dir}`")
    rows = model_stats(units)
    comparisons = pairwise(units) if len(rows) > 1 else []
    write_tables(run_dir, rows, comparisons)
    files = [run_dir / f"comparison.{ext}" for ext in ("md", "csv", "json")]
    files += write_plots(run_dir, units, image_format)
    config = read_config(run_dir)
    specs = saved_specs(run_dir)
    classes = class_names(config.get("dataset", ""), specs.values())
    details = model_details(run_dir, units, specs, classes, image_format)
    files += [path for d in details for key, path in d.figures.items() if key in ("confusion", "mistakes")]
    files += write_report(run_dir, config, classes, rows, comparisons, details)
    return RunSummary(rows, comparisons, files)


# ---------------------------------------------------------------------------------------------
# Reading the run folder


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunError(f"{path} is missing; the run folder is incomplete (rerun the model or resume the run)") from None
    except Exception as exc:  # a truncated or foreign file: torch raises several types
        raise RunError(f"{path} cannot be read ({exc}); the run folder is damaged") from None


def saved_specs(run_dir: Path) -> dict[str, ModelSpec]:
    """The spec of every model of the run, as trained (`<model>/spec.toml`)."""
    return {path.parent.name: read_spec(path) for path in sorted(run_dir.glob("*/spec.toml"))}


def class_names(dataset: str, specs: Iterable[ModelSpec]) -> tuple[str, ...]:
    """The dataset's class names from the registry, then '10', '11', ... for any further model outputs."""
    names = DATASETS[dataset].classes if dataset in DATASETS else ()
    count = max([len(names)] + [spec.num_classes for spec in specs])
    return tuple(names) + tuple(str(i) for i in range(len(names), count))


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs; rows are true classes."""
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def model_details(run_dir: Path, units: Sequence[UnitResult], specs: dict[str, ModelSpec],
                  classes: Sequence[str], image_format: str = "png") -> list[ModelDetails]:
    """Per model: FLOPs, the confusion matrix over its seeds and its most confident mistakes, with their figures."""
    groups: dict[str, list[UnitResult]] = {}
    for unit in units:
        groups.setdefault(unit.model, []).append(unit)
    details = []
    for model, group in groups.items():
        confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
        mistakes = None
        for unit in group:
            folder = unit_dir(run_dir, model, unit.seed)
            predicted = _load_tensors(folder / "predictions.pt")
            confusion += confusion_matrix(predicted["labels"], predicted["predictions"], len(classes))
            if mistakes is None and (folder / "mistakes.pt").exists():
                stored = _load_tensors(folder / "mistakes.pt")
                mistakes = Mistakes(unit.seed, *(stored[k].numpy() for k in
                                                 ("images", "labels", "predictions", "confidences")))
        summary = summarize(specs[model]) if model in specs else None
        forward, training = (summary.forward_flops, summary.training_flops) if summary else (None, None)
        seeds = f" ({len(group)} seeds)" if len(group) > 1 else ""
        figures = {curve: run_dir / f"{curve}_{model}.{image_format}" for curve in ("loss", "accuracy")}
        figures["confusion"] = confusion_figure(confusion, classes, f"{model}: confusion matrix{seeds}",
                                                run_dir / f"confusion_{model}.{image_format}")
        if mistakes is not None and len(mistakes.images):
            seed_note = f", seed {mistakes.seed}" if len(group) > 1 else ""
            figures["mistakes"] = mistakes_figure(
                mistakes.images, mistakes.labels, mistakes.predictions, mistakes.confidences, classes,
                f"{model}: most confident mistakes{seed_note}", run_dir / f"mistakes_{model}.{image_format}")
        details.append(ModelDetails(model, group, forward, training, confusion, mistakes, figures))
    return details


def reproduce_command(run_dir: Path, config: dict[str, Any]) -> str:
    """The `cnnlab compare` command line that trains this run again with its resolved settings."""
    models = []
    for name in config.get("models", []):
        saved = run_dir / name / "spec.toml"
        builtin = name in builtin_models() and saved.exists() and _same_spec(saved, builtin_spec_text(name))
        models.append(name if builtin else str(saved))
    train = TrainConfig(**config.get("train", {}))
    seeds = [str(s) for s in config.get("seeds", [0])]
    args = ["cnnlab", "compare", *models, "--dataset", str(config.get("dataset", "mnist"))]
    args += ["--seed", seeds[0]] if len(seeds) == 1 else ["--seeds", ",".join(seeds)]
    args += ["--epochs", str(train.epochs), "--batch-size", str(train.batch_size), "--lr", repr(train.learning_rate),
             "--device", train.device, "--precision", train.precision, "--compile", train.compile]
    if train.limit_train is not None:
        args += ["--limit-train", str(train.limit_train)]
    if train.limit_test is not None:
        args += ["--limit-test", str(train.limit_test)]
    if train.val_split:
        args += ["--val-split", repr(train.val_split)]
    if config.get("data_dir"):
        args += ["--data-dir", str(config["data_dir"])]
    return shlex.join(args)


def _same_spec(saved: Path, builtin_text: str) -> bool:
    """Whether a saved spec.toml is the built-in spec (compared as parsed specs, not text)."""
    parse = lambda text: parse_spec(tomllib.loads(text), default_name=saved.parent.name)  # noqa: E731
    return parse(saved.read_text(encoding="utf-8")) == parse(builtin_text)


# ---------------------------------------------------------------------------------------------
# The report's content, shared by HTML and Markdown


@dataclass
class _Report:
    title: str
    facts: list[tuple[str, str]]
    incomplete: str
    rows: list[ModelStats]
    comparisons: list[Comparison]
    details: list[ModelDetails]
    classes: Sequence[str]
    overlay: Path
    command: str
    typed_command: str
    environment: list[tuple[str, str]]
    config_text: str


def _format_flops(flops: int | None) -> str:
    return "–" if flops is None else format_flops(flops)


def _pp(value: float) -> str:
    return "–" if math.isnan(value) else f"{value * 100:+.2f}"


def pairwise_rows(comparisons: Sequence[Comparison]) -> tuple[list[str], list[list[str]]]:
    """The pairwise table: difference in mean test accuracy (pp), its 95% CI, Welch's p, verdict."""
    headers = ["Model A", "Model B", "A − B (pp)", "95% CI (pp)", "p (Welch)", "Seeds", "Verdict"]
    rows = []
    for c in comparisons:
        if not c.testable:
            verdict = "not tested"
        elif c.significant:
            verdict = f"{c.a if c.difference > 0 else c.b} better"
        else:
            verdict = "no significant difference"
        ci = "–" if math.isnan(c.ci_low) else f"{c.ci_low * 100:.2f} to {c.ci_high * 100:.2f}"
        p_value = "–" if math.isnan(c.p_value) else ("< 0.001" if c.p_value < 0.001 else f"{c.p_value:.3f}")
        seeds = str(c.n_a) if c.n_a == c.n_b else f"{c.n_a} / {c.n_b}"
        rows.append([c.a, c.b, _pp(c.difference), ci, p_value, seeds, verdict])
    return headers, rows


def cost_rows(details: Sequence[ModelDetails]) -> tuple[list[str], list[list[str]]]:
    """Per model: size, FLOPs per sample, training time and throughput (means over seeds).

    Wall time and precision are in the comparison table already.
    """
    headers = ["Model", "Params", "FLOPs/sample (inference)", "FLOPs/sample (training)", "Epochs",
               "Training time", "s/epoch", "Samples/s", "Training GFLOP/s", "Device"]
    rows = []
    for d in details:
        hardware = d.units[0].metrics.get("hardware", {})
        rows.append([d.name, f"{d.units[0].metrics['params']:,}", _format_flops(d.forward_flops),
                     _format_flops(d.training_flops), str(d.units[0].metrics["epochs"]),
                     format_duration(d.mean_metric("train_seconds")), f"{d.mean_metric('seconds_per_epoch'):.1f}",
                     f"{d.mean_metric('samples_per_second'):,.0f}", f"{d.mean_metric('train_gflops_per_second'):.1f}",
                     str(hardware.get("device_name", "?"))])
    return headers, rows


def per_class_rows(details: Sequence[ModelDetails], classes: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Rows are classes: test images per seed, then each model's accuracy on that class."""
    headers = ["Class", "Test images"] + [d.name for d in details]
    support = details[0].confusion.sum(axis=1) // max(len(details[0].units), 1)
    rows = []
    for i, name in enumerate(classes):
        cells = [name, f"{support[i]:,}"]
        cells += ["–" if math.isnan(a) else f"{a:.4f}" for a in (d.per_class_accuracy[i] for d in details)]
        rows.append(cells)
    return headers, rows


def _environment_rows(environment: dict[str, Any]) -> list[tuple[str, str]]:
    skip = {"command"}
    return [(key, "–" if value is None else str(value)) for key, value in environment.items() if key not in skip]


def _build(run_dir: Path, config: dict[str, Any], classes: Sequence[str], rows: Sequence[ModelStats],
           comparisons: Sequence[Comparison], details: Sequence[ModelDetails]) -> _Report:
    environment = read_json(run_dir / "environment.json") if (run_dir / "environment.json").exists() else {}
    dataset = config.get("dataset", "?")
    first = details[0].units[0]
    train = config.get("train", {})
    hardware = first.metrics.get("hardware", {})
    images = f"{int(details[0].confusion.sum()) // len(details[0].units):,} test images"
    if train.get("limit_train"):
        images = f"the first {train['limit_train']:,} training images, " + images
    facts = [
        ("Dataset", f"{DATASETS[dataset].title if dataset in DATASETS else dataset} ({images})"),
        ("Models", ", ".join(d.name for d in details)),
        ("Seeds", ", ".join(str(s) for s in config.get("seeds", []))),
        ("Epochs", f"{train.get('epochs', first.metrics['epochs'])}, batch size {train.get('batch_size', '?')}, "
                   f"learning rate {train.get('learning_rate', '?')}"),
        ("Hardware", f"{hardware.get('device_name', '?')} ({hardware.get('device', '?')}), "
                     f"{hardware.get('precision', '?')}, {hardware.get('threads', '?')} threads"),
        ("Started", str(environment.get("started", "?"))),
    ]
    expected = len(config.get("models", [])) * len(config.get("seeds", []))
    finished = sum(len(d.units) for d in details)
    incomplete = ""
    if finished < expected:
        incomplete = (f"This run is incomplete: {finished} of {expected} model/seed runs finished. "
                      f"Finish it with `cnnlab compare --resume {run_dir}`.")
    overlay = run_dir / f"curves_all{details[0].figures['loss'].suffix}"  # written by write_plots
    config_path = run_dir / "config.toml"
    return _Report(
        title=f"cnnlab report: {run_dir.name}", facts=facts, incomplete=incomplete,
        rows=list(rows), comparisons=list(comparisons),
        details=list(details), classes=classes, overlay=overlay, command=reproduce_command(run_dir, config),
        typed_command=str(environment.get("command", "")), environment=_environment_rows(environment),
        config_text=config_path.read_text(encoding="utf-8") if config_path.exists() else "",
    )


def write_report(run_dir: Path, config: dict[str, Any], classes: Sequence[str], rows: Sequence[ModelStats],
                 comparisons: Sequence[Comparison], details: Sequence[ModelDetails]) -> list[Path]:
    """report.html (self-contained) and report.md (linking the figures) in the run folder."""
    report = _build(run_dir, config, classes, rows, comparisons, details)
    write_text(run_dir / "report.html", render_html(report))
    write_text(run_dir / "report.md", render_markdown(report, run_dir))
    return [run_dir / "report.html", run_dir / "report.md"]


# ---------------------------------------------------------------------------------------------
# HTML


CSS = """
:root { --fg: #1f2328; --muted: #59636e; --border: #d8dee4; --alt: #f6f8fa; --accent: #0969da;
        --good: #1a7f37; --neutral: #9a6700; --none: #8c959f; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff;
       font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica, Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 26px; margin: 0 0 12px; }
h2 { font-size: 20px; margin: 40px 0 12px; padding-bottom: 6px; border-bottom: 1px solid var(--border); }
h3 { font-size: 16px; margin: 22px 0 8px; }
nav { display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 12px 0 0; font-size: 14px; }
nav a, a { color: var(--accent); text-decoration: none; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 18px; margin: 0; font-size: 14px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; border-radius: 6px; padding: 8px 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13.5px; font-variant-numeric: tabular-nums; margin: 6px 0 10px; }
th, td { padding: 6px 12px; text-align: right; white-space: nowrap; border-bottom: 1px solid var(--border); }
th { background: var(--alt); font-weight: 600; border-bottom: 2px solid var(--border); }
th:first-child, td:first-child, th.text, td.text { text-align: left; }
tbody tr:nth-child(even) { background: #fbfcfd; }
tbody tr:hover { background: #eef5ff; }
td.best { font-weight: 700; }
ul.verdicts { list-style: none; padding: 0; margin: 10px 0; }
ul.verdicts li { margin: 6px 0; padding: 7px 12px; background: var(--alt); border-left: 4px solid var(--none);
                 border-radius: 0 6px 6px 0; }
ul.verdicts li.significant { border-left-color: var(--good); }
ul.verdicts li.not-significant { border-left-color: var(--neutral); }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 16px; margin: 8px 0; }
.figures.pair { grid-template-columns: repeat(auto-fit, minmax(400px, 1fr)); }
.figures.wide { grid-template-columns: 1fr; }
figure { margin: 0; padding: 10px; border: 1px solid var(--border); border-radius: 8px; background: #fff; }
figure img { display: block; width: 100%; height: auto; }
figcaption { margin-top: 6px; color: var(--muted); font-size: 13px; }
.note { color: var(--muted); font-size: 13.5px; }
pre { background: var(--alt); border: 1px solid var(--border); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; font-size: 13px; white-space: pre-wrap; word-break: break-all; }
code { font-family: ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
"""

_MIME = {".png": "image/png", ".svg": "image/svg+xml"}


def data_uri(path: Path) -> str:
    """The file as a base64 data: URI, so the page needs nothing beside it."""
    mime = _MIME.get(path.suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,),
               best: dict[int, set[int]] | None = None) -> str:
    """A table; `text_columns` are left-aligned, `best[row]` lists cells to show bold."""
    best = best or {}
    align = lambda i: ' class="text"' if i in text_columns else ""  # noqa: E731
    head = "".join(f"<th{align(i)}>{_escape(h)}</th>" for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cells = []
        for i, cell in enumerate(row):
            classes = [c for c in ("text" if i in text_columns else "", "best" if i in best.get(r, ()) else "") if c]
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_escape(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{_escape(caption)}">'
            f"<figcaption>{_escape(caption)}</figcaption></figure>")


def _verdict_class(c: Comparison) -> str:
    return "significant" if c.significant else ("not-significant" if c.testable else "untested")


def render_html(report: _Report) -> str:
    """The report as one HTML page with every figure embedded: it opens anywhere, offline."""
    sections: list[tuple[str, str, str]] = []  # (id, title, body)

    body = html_table(columns(report.rows), table_rows(report.rows), text_columns=(0, len(columns(report.rows)) - 1))
    if report.comparisons:
        items = "".join(f'<li class="{_verdict_class(c)}">{_escape(c.sentence())}</li>' for c in report.comparisons)
        headers, rows = pairwise_rows(report.comparisons)
        body += (f'<h3>Pairwise comparisons</h3><ul class="verdicts">{items}</ul>'
                 + html_table(headers, rows, text_columns=(0, 1, 6))
                 + '<p class="note">Difference in mean test accuracy over seeds, in percentage points; '
                   "95% confidence interval and p-value from Welch's t-test (unequal variances).</p>")
    sections.append(("comparison", "Comparison", body))

    headers, rows = cost_rows(report.details)
    sections.append(("cost", "Size, cost and speed", html_table(headers, rows, text_columns=(0, 9))
                     + '<p class="note">FLOPs per sample count convolutions and dense layers (2 per multiply-add); '
                       "a training step is taken as three forward passes. Times and throughput are means over "
                       "seeds; training time excludes the evaluation after each epoch.</p>"))

    curves = []
    if report.overlay.exists():
        curves.append(f'<div class="figures wide">{_figure(report.overlay, "All models: validation solid, training dashed")}</div>')
    for d in report.details:
        note = f" ({len(d.units)} seeds: each faint, mean bold)" if len(d.units) > 1 else ""
        curves.append(f"<h3>{_escape(d.name)}</h3><div class=\"figures pair\">"
                      + _figure(d.figures["loss"], f"{d.name}: loss per epoch{note}")
                      + _figure(d.figures["accuracy"], f"{d.name}: accuracy per epoch{note}") + "</div>")
    sections.append(("curves", "Learning curves", "".join(curves)))

    figures = "".join(_figure(d.figures["confusion"], _confusion_caption(d)) for d in report.details)
    headers, rows = per_class_rows(report.details, report.classes)
    best = _best_per_row(rows, first_value=2) if len(report.details) > 1 else None
    sections.append(("confusion", "Confusion matrices and per-class accuracy",
                     f'<div class="figures">{figures}</div><h3>Per-class test accuracy</h3>'
                     + html_table(headers, rows, best=best)))

    mistakes = []
    for d in report.details:
        if "mistakes" in d.figures:
            mistakes.append(_figure(d.figures["mistakes"], _mistakes_caption(d)))
        else:
            reason = ("it got every test image right" if d.mistakes is not None
                      else "this run folder did not record them (made by an older cnnlab)")
            mistakes.append(f'<p class="note">{_escape(d.name)}: no mistakes to show; {_escape(reason)}.</p>')
    sections.append(("mistakes", "Most confident mistakes", f'<div class="figures wide">{"".join(mistakes)}</div>'))

    reproduce = (f"<p>Train this run again with:</p><pre><code>{_escape(report.command)}</code></pre>")
    if report.typed_command:
        reproduce += f'<p class="note">Command as typed:</p><pre><code>{_escape(report.typed_command)}</code></pre>'
    reproduce += ("<h3>Environment</h3>" + html_table(["", "Value"], report.environment, text_columns=(0, 1))
                  if report.environment else '<p class="note">environment.json is missing.</p>')
    if report.config_text:
        reproduce += f"<h3>Configuration (config.toml)</h3><pre><code>{_escape(report.config_text)}</code></pre>"
    sections.append(("reproduce", "Reproduce", reproduce))

    nav = "".join(f'<a href="#{sid}">{_escape(title)}</a>' for sid, title, _ in sections)
    facts = "".join(f"<dt>{_escape(k)}</dt><dd>{_escape(v)}</dd>" for k, v in report.facts)
    warning = f'<p class="warning">{_escape(report.incomplete)}</p>' if report.incomplete else ""
    content = "".join(f'<section id="{sid}"><h2>{_escape(title)}</h2>{body}</section>' for sid, title, body in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_escape(report.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<header><h1>{_escape(report.title)}</h1><dl class=\"facts\">{facts}</dl><nav>{nav}</nav></header>\n"
            f"{warning}{content}\n</main>\n</body>\n</html>\n")


def _best_per_row(rows: Sequence[Sequence[str]], first_value: int) -> dict[int, set[int]]:
    """Index of the highest numeric cell(s) from `first_value` on, per row (ties all bold)."""
    best = {}
    for r, row in enumerate(rows):
        values = {i: float(cell) for i, cell in enumerate(row) if i >= first_value and cell != "–"}
        if values and len(set(values.values())) > 1:  # a row where every model ties stays plain
            top = max(values.values())
            best[r] = {i for i, v in values.items() if v == top}
    return best


def _confusion_caption(d: ModelDetails) -> str:
    seeds = f", summed over {len(d.units)} seeds" if len(d.units) > 1 else ""
    return f"{d.name}: rows are true classes, columns predicted; counts{seeds}"


def _mistakes_caption(d: ModelDetails) -> str:
    assert d.mistakes is not None
    seed = f" (seed {d.mistakes.seed})" if len(d.units) > 1 else ""
    return (f"{d.name}{seed}: the {len(d.mistakes.images)} test images it gets wrong with the highest confidence; "
            "true label, predicted label and the predicted class's probability under each")


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: Sequence[int] = (0,)) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) or " " for h in headers) + " |",
             "| " + " | ".join("---" if i in text_columns else "---:" for i in range(len(headers))) + " |"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _md_image(path: Path, run_dir: Path, caption: str) -> str:
    return f"![{caption}]({path.relative_to(run_dir).as_posix()})\n"


def render_markdown(report: _Report, run_dir: Path) -> str:
    """The report in Markdown; figures are linked as files of the run folder."""
    out = [f"# {report.title}\n"]
    out += [f"- **{k}:** {v}" for k, v in report.facts]
    out.append("")
    if report.incomplete:
        out.append(f"> **Warning:** {report.incomplete}\n")
    out.append("## Comparison\n")
    out.append(markdown_table(report.rows))
    if report.comparisons:
        out.append("### Pairwise comparisons\n")
        out += [f"- {c.sentence()}" for c in report.comparisons]
        out.append("")
        headers, rows = pairwise_rows(report.comparisons)
        out.append(_md_table(headers, rows, text_columns=(0, 1, 6)))
    out.append("## Size, cost and speed\n")
    headers, rows = cost_rows(report.details)
    out.append(_md_table(headers, rows, text_columns=(0, 9)))
    out.append("## Learning curves\n")
    if report.overlay.exists():
        out.append(_md_image(report.overlay, run_dir, "All models"))
    for d in report.details:
        out.append(f"### {d.name}\n")
        out.append(_md_image(d.figures["loss"], run_dir, f"{d.name} loss").rstrip()
                   + " " + _md_image(d.figures["accuracy"], run_dir, f"{d.name} accuracy"))
    out.append("## Confusion matrices\n")
    for d in report.details:
        out.append(_md_image(d.figures["confusion"], run_dir, _confusion_caption(d)))
    out.append("### Per-class test accuracy\n")
    headers, rows = per_class_rows(report.details, report.classes)
    out.append(_md_table(headers, rows))
    out.append("## Most confident mistakes\n")
    for d in report.details:
        if "mistakes" in d.figures:
            out.append(f"{_mistakes_caption(d)}.\n")
            out.append(_md_image(d.figures["mistakes"], run_dir, f"{d.name} mistakes"))
        else:
            out.append(f"{d.name}: no mistakes to show.\n")
    out.append("## Reproduce\n")
    out.append(f"```sh\n{report.command}\n```\n")
    if report.typed_command:
        out.append(f"Command as typed: `{report.typed_command}`\n")
    if report.environment:
        out.append("### Environment\n")
        out.append(_md_table(["Key", "Value"], report.environment, text_columns=(0, 1)))
    if report.config_text:
        out.append("### Configuration (config.toml)\n")
        out.append(f"```toml\n{report.config_text.rstrip()}\n```\n")
    return "\n".join(out)


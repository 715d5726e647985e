"""The report of a run, rendered: one self-contained HTML page and the same in Markdown.

This module only renders. What the report says comes from `analysis.analyze`, its tables from
`tables.py` and its figures from `plots.py`; `api.report` puts them together and writes the files.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnlab.analysis import ArmDetails, ModelSettings, RunAnalysis
from cnnlab.datasets import DATASETS
from cnnlab.stats import Comparison
from cnnlab.tables import (
    COST_TEXT_COLUMNS,
    PAIRWISE_TEXT_COLUMNS,
    comparison_headers,
    comparison_rows,
    comparison_text_columns,
    cost_table,
    markdown_table,
    pairwise_table,
    per_class_table,
    settings_note,
    settings_table,
    statistics_note,
)


@dataclass(frozen=True)
class Figures:
    """The figure files of a report: the overlay of all arms, and per arm its curves, confusion, mistakes."""

    overlay: Path | None
    arms: dict[str, dict[str, Path]] = field(default_factory=dict)  # arm name -> {"loss", "accuracy", ...}
    settings: dict[str, Path] = field(default_factory=dict)  # swept key's label -> accuracy against it


def facts(analysis: RunAnalysis) -> list[tuple[str, str]]:
    """The report's header: dataset, arms, seeds, recipe, hardware, start."""
    plan, first = analysis.plan, analysis.details[0]
    dataset = plan.data.dataset
    images = f"{int(first.confusion.sum()) // len(first.units):,} test images"
    if plan.data.limit_train:
        images = f"the first {plan.data.limit_train:,} training images, " + images
    if plan.data.val_split:
        images += f", {plan.data.val_split:g} of the training images held out for validation"
    recipes = {arm.recipe for arm in plan.arms}
    recipe = plan.arms[0].recipe
    training = (
        f"{recipe.epochs} epochs, batch size {recipe.batch_size}, learning rate {recipe.learning_rate}"
        if len(recipes) == 1
        else "differs by arm (see the arm names and config.toml)"
    )
    if len(recipes) == 1 and recipe.epochs == 0:
        training = "none: the initial weights are tested as they are"
    hardware = analysis.hardware
    hardware_text = (
        f"{hardware.device_name} ({hardware.device}), {hardware.precision}, {hardware.threads} threads"
        if hardware
        else "?"
    )
    sources = analysis.sources
    if sources and len({_training_data(s["data"]) for s in sources}) > 1:
        images = f"{int(first.confusion.sum()) // len(first.units):,} test images; the training data differs by run"
    if sources:
        hardware_text = "as each combined run recorded (see the cost table)"
    rows = [
        ("Dataset", f"{DATASETS[dataset].title if dataset in DATASETS else dataset} ({images})"),
        ("Models", ", ".join(d.name for d in analysis.details)),
        ("Seeds", ", ".join(str(s) for s in plan.seeds)),
        ("Training", training),
        ("Hardware", hardware_text),
        ("Started", str(analysis.environment.get("started", "?"))),
    ]
    if plan.initial_weights is not None:
        rows.append(("Initial weights", f"{plan.initial_weights.source} (SHA-256 {plan.initial_weights.sha256[:12]}…)"))
    if sources:
        rows.append(("Combined from", "; ".join(_source_text(s) for s in sources)))
    return rows


def _training_data(data: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(data.get(k) for k in ("limit_train", "val_split", "split_seed", "split"))


def _source_text(source: dict[str, Any]) -> str:
    data = source["data"]
    arms = len(source["arms"])
    parts = [f"{arms} arm{'s' if arms != 1 else ''}", f"seeds {', '.join(str(s) for s in source['seeds'])}"]
    if data.get("limit_train"):
        parts.append(f"first {data['limit_train']:,} training images")
    split = data.get("val_split") or 0
    parts.append(f"val split {split:g} (split seed {data.get('split_seed', 0)})" if split else "no validation split")
    return f"{source.get('run', '?')} ({', '.join(parts)})"


def incomplete_note(analysis: RunAnalysis) -> str:
    """A warning when some units have no results: how many, which failed and why, and how to finish."""
    if not analysis.unfinished:
        return ""
    total = len(analysis.plan.units())
    note = f"This run is incomplete: {total - len(analysis.unfinished)} of {total} units finished. "
    failed = [u for u in analysis.unfinished if u.state == "failed"]
    if failed:
        note += "Failed: " + "; ".join(f"{u.label} ({u.error})" for u in failed) + ". "
    return note + f"Finish it with `cnnlab compare --resume {analysis.folder}`."


def _environment_rows(environment: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, "–" if value is None else str(value)) for key, value in environment.items() if key != "command"]


def _confusion_caption(d: ArmDetails) -> str:
    seeds = f", summed over {len(d.units)} seeds" if len(d.units) > 1 else ""
    return f"{d.name}: rows are true classes, columns predicted; counts{seeds}"


def _mistakes_caption(d: ArmDetails) -> str:
    assert d.mistakes is not None
    seed = f" (seed {d.mistakes.seed})" if len(d.units) > 1 else ""
    return (
        f"{d.name}{seed}: the {len(d.mistakes.images)} test images it gets wrong with the highest confidence; "
        "true label, predicted label and the predicted class's probability under each"
    )


def _no_command_note(report: RunAnalysis) -> str:
    if report.sources:
        return (
            "This run was combined from others (see Combined from above): train each of them again with the "
            "command in its own report; config.toml below records the combined plan and sources.json its sources."
        )
    return (
        "The arms of this run differ in settings the command line cannot express in one command; "
        "config.toml below records the whole plan."
    )


def settings_intro(report: RunAnalysis) -> str:
    """What the Settings section shows, in words."""
    return (
        "Each model's arms that differ in settings: the best setting of each model, chosen by the rule "
        "against choosing on the test set (validation accuracy when the run held out validation images; "
        "otherwise test accuracy, labelled optimistic), and the best setting tested against each runner-up."
    )


def settings_caption(key: str, report: RunAnalysis) -> str:
    lines = "test accuracy solid, validation accuracy dashed" if report.on_validation else "test accuracy"
    return (
        f"Mean accuracy against {key}, one line per model ({lines}); error bars: 95% t interval over seeds "
        "(none for one seed); any other swept setting held at the model's best"
    )


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
.choice { font-weight: 600; }
pre { background: var(--alt); border: 1px solid var(--border); border-radius: 6px; padding: 10px 12px;
      overflow-x: auto; font-size: 13px; white-space: pre-wrap; word-break: break-all; }
code { font-family: ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
"""

UNTRAINED = (
    "Not trained here (0 epochs): its initial weights (--init-from) are tested as they are, so it has no curves."
)
_MIME = {".png": "image/png", ".svg": "image/svg+xml"}


def data_uri(path: Path) -> str:
    """The file as a base64 data: URI, so the page needs nothing beside it."""
    mime = _MIME.get(path.suffix, "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def html_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    text_columns: Sequence[int] = (0,),
    best: dict[int, set[int]] | None = None,
) -> str:
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
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _figure(path: Path, caption: str) -> str:
    return (
        f'<figure><img src="{data_uri(path)}" alt="{_escape(caption)}">'
        f"<figcaption>{_escape(caption)}</figcaption></figure>"
    )


def _augmented_caption(d: ArmDetails) -> str:
    return (f"{d.name}: training images (top row) and random augmentations of them as training saw them "
            "(a fresh draw for the report)")  # fmt: skip


def _verdict_class(c: Comparison) -> str:
    return "significant" if c.significant else ("not-significant" if c.testable else "untested")


def render_html(report: RunAnalysis, figures: Figures) -> str:
    """The report as one HTML page with every figure embedded: it opens anywhere, offline."""
    sections: list[tuple[str, str, str]] = []  # (id, title, body)

    body = html_table(
        comparison_headers(report.rows), comparison_rows(report.rows), text_columns=comparison_text_columns(report.rows)
    )
    body += f'<p class="note">{_escape(statistics_note(report.rows, report.comparisons))}</p>'
    if report.choice is not None:
        body += f'<p class="choice">{_escape(report.choice.sentence())}</p>'
    if report.comparisons:
        items = "".join(f'<li class="{_verdict_class(c)}">{_escape(c.sentence())}</li>' for c in report.comparisons)
        headers, rows = pairwise_table(report.comparisons)
        body += (
            f'<h3>Pairwise comparisons</h3><ul class="verdicts">{items}</ul>'
            + html_table(headers, rows, text_columns=PAIRWISE_TEXT_COLUMNS)
            + '<p class="note">Difference in mean test accuracy over seeds, in percentage points; its '
            "95% confidence interval (unadjusted) and p-value from Welch's t-test (unequal variances); the "
            "verdict uses the Holm-adjusted p-value over all pairwise comparisons of this run.</p>"
        )
    sections.append(("comparison", "Comparison", body))

    if report.settings:
        sections.append(("settings", "Settings", _settings_html(report, figures)))

    headers, rows = cost_table(report.details)
    sections.append(
        (
            "cost",
            "Size, cost and speed",
            html_table(headers, rows, text_columns=COST_TEXT_COLUMNS)
            + '<p class="note">FLOPs per sample count convolutions and dense layers (2 per multiply-add); '
            "a training step is taken as three forward passes. Times and throughput are means over "
            "seeds; training time excludes the evaluation after each epoch.</p>",
        )
    )

    curves = []
    if figures.overlay is not None:
        curves.append(
            f'<div class="figures wide">{_figure(figures.overlay, "All models: validation solid, training dashed")}</div>'
        )
    for d in report.details:
        if "loss" not in figures.arms[d.name]:
            curves.append(f"<h3>{_escape(d.name)}</h3><p>{UNTRAINED}</p>")
            continue
        note = f" ({len(d.units)} seeds: each faint, mean bold)" if len(d.units) > 1 else ""
        curves.append(
            f'<h3>{_escape(d.name)}</h3><div class="figures pair">'
            + _figure(figures.arms[d.name]["loss"], f"{d.name}: loss per epoch{note}")
            + _figure(figures.arms[d.name]["accuracy"], f"{d.name}: accuracy per epoch{note}")
            + (_figure(figures.arms[d.name]["learning_rate"], f"{d.name}: learning rate at the end of each epoch")
               if "learning_rate" in figures.arms[d.name] else "")
            + "</div>"
        )  # fmt: skip
    sections.append(("curves", "Learning curves", "".join(curves)))

    augmented = [_figure(figures.arms[d.name]["augmented"], _augmented_caption(d)) for d in report.details
                 if "augmented" in figures.arms[d.name]]  # fmt: skip
    if augmented:
        sections.append(("augmentation", "Augmentation", f'<div class="figures wide">{"".join(augmented)}</div>'))

    confusions = "".join(_figure(figures.arms[d.name]["confusion"], _confusion_caption(d)) for d in report.details)
    headers, rows = per_class_table(report.details, report.classes)
    best = _best_per_row(rows, first_value=2) if len(report.details) > 1 else None
    sections.append(
        (
            "confusion",
            "Confusion matrices and per-class accuracy",
            f'<div class="figures">{confusions}</div><h3>Per-class test accuracy</h3>'
            + html_table(headers, rows, best=best),
        )
    )

    mistakes = []
    for d in report.details:
        if "mistakes" in figures.arms[d.name]:
            mistakes.append(_figure(figures.arms[d.name]["mistakes"], _mistakes_caption(d)))
        else:
            reason = (
                "it got every test image right"
                if d.mistakes is not None
                else "this run folder did not record them (made by an older cnnlab)"
            )
            mistakes.append(f'<p class="note">{_escape(d.name)}: no mistakes to show; {_escape(reason)}.</p>')
    sections.append(("mistakes", "Most confident mistakes", f'<div class="figures wide">{"".join(mistakes)}</div>'))

    if report.command:
        reproduce = f"<p>Train this run again with:</p><pre><code>{_escape(report.command)}</code></pre>"
    else:
        reproduce = f'<p class="note">{_escape(_no_command_note(report))}</p>'
    typed = report.environment.get("command")
    if typed:
        reproduce += f'<p class="note">Command as typed:</p><pre><code>{_escape(typed)}</code></pre>'
    environment = _environment_rows(report.environment)
    reproduce += (
        "<h3>Environment</h3>" + html_table(["", "Value"], environment, text_columns=(0, 1))
        if environment
        else '<p class="note">environment.json is missing.</p>'
    )
    if report.config_text:
        reproduce += f"<h3>Configuration (config.toml)</h3><pre><code>{_escape(report.config_text)}</code></pre>"
    sections.append(("reproduce", "Reproduce", reproduce))

    nav = "".join(f'<a href="#{sid}">{_escape(title)}</a>' for sid, title, _ in sections)
    title = f"cnnlab report: {report.folder.path.name}"
    header = "".join(f"<dt>{_escape(k)}</dt><dd>{_escape(v)}</dd>" for k, v in facts(report))
    incomplete = incomplete_note(report)
    warning = f'<p class="warning">{_escape(incomplete)}</p>' if incomplete else ""
    content = "".join(f'<section id="{sid}"><h2>{_escape(title)}</h2>{body}</section>' for sid, title, body in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f'<header><h1>{_escape(title)}</h1><dl class="facts">{header}</dl><nav>{nav}</nav></header>\n'
        f"{warning}{content}\n</main>\n</body>\n</html>\n"
    )


def _settings_html(report: RunAnalysis, figures: Figures) -> str:
    body = f'<p class="note">{_escape(settings_intro(report))}</p>'
    for model in report.settings:
        headers, rows, text = settings_table(model)
        items = "".join(f'<li class="{_verdict_class(c)}">{_escape(c.sentence())}</li>' for c in model.tests)
        body += (
            f'<h3>{_escape(model.model)}</h3><p class="choice">{_escape(model.sentence())}</p>'
            + html_table(headers, rows, text_columns=text, best=_best_row(model, rows))
            + (f'<ul class="verdicts">{items}</ul>' if items else "")
            + f'<p class="note">{_escape(settings_note(model))}</p>'
        )
    plots = "".join(_figure(path, settings_caption(key, report)) for key, path in figures.settings.items())
    if plots:
        body += f'<h3>Accuracy against each swept setting</h3><div class="figures">{plots}</div>'
    return body


def _best_row(model: ModelSettings, rows: Sequence[Sequence[str]]) -> dict[int, set[int]]:
    """The best setting's row, bold."""
    best = model.best
    if best is None:
        return {}
    index = [a.arm for a in model.arms].index(best.arm)
    return {index: set(range(len(rows[index])))}


def _best_per_row(rows: Sequence[Sequence[str]], first_value: int) -> dict[int, set[int]]:
    """Index of the highest numeric cell(s) from `first_value` on, per row (ties all bold)."""
    best = {}
    for r, row in enumerate(rows):
        values = {i: float(cell) for i, cell in enumerate(row) if i >= first_value and cell != "–"}
        if values and len(set(values.values())) > 1:  # a row where every model ties stays plain
            top = max(values.values())
            best[r] = {i for i, v in values.items() if v == top}
    return best


# ---------------------------------------------------------------------------------------------
# Markdown


def _md_image(path: Path, base: Path, caption: str) -> str:
    return f"![{caption}]({path.relative_to(base).as_posix()})\n"


def render_markdown(report: RunAnalysis, figures: Figures) -> str:
    """The report in Markdown; figures are linked as files of the run folder."""
    base = report.folder.path
    out = [f"# cnnlab report: {base.name}\n"]
    out += [f"- **{k}:** {v}" for k, v in facts(report)]
    out.append("")
    incomplete = incomplete_note(report)
    if incomplete:
        out.append(f"> **Warning:** {incomplete}\n")
    out.append("## Comparison\n")
    out.append(
        markdown_table(
            comparison_headers(report.rows), comparison_rows(report.rows), comparison_text_columns(report.rows)
        )
    )
    out.append(statistics_note(report.rows, report.comparisons) + "\n")
    if report.choice is not None:
        out.append(f"**{report.choice.sentence()}**\n")
    if report.comparisons:
        out.append("### Pairwise comparisons\n")
        out += [f"- {c.sentence()}" for c in report.comparisons]
        out.append("")
        headers, rows = pairwise_table(report.comparisons)
        out.append(markdown_table(headers, rows, text_columns=PAIRWISE_TEXT_COLUMNS))
    if report.settings:
        out += _settings_markdown(report, figures)
    out.append("## Size, cost and speed\n")
    headers, rows = cost_table(report.details)
    out.append(markdown_table(headers, rows, text_columns=COST_TEXT_COLUMNS))
    out.append("## Learning curves\n")
    if figures.overlay is not None:
        out.append(_md_image(figures.overlay, base, "All models"))
    for d in report.details:
        arm = figures.arms[d.name]
        out.append(f"### {d.name}\n")
        if "loss" not in arm:
            out.append(f"{UNTRAINED}\n")
            continue
        out.append(
            _md_image(arm["loss"], base, f"{d.name} loss").rstrip()
            + " "
            + _md_image(arm["accuracy"], base, f"{d.name} accuracy")
        )
        if "learning_rate" in arm:
            out.append(_md_image(arm["learning_rate"], base, f"{d.name} learning rate"))
        if "augmented" in arm:
            out.append(f"{_augmented_caption(d)}.\n")
            out.append(_md_image(arm["augmented"], base, f"{d.name} augmented images"))
    out.append("## Confusion matrices\n")
    for d in report.details:
        out.append(_md_image(figures.arms[d.name]["confusion"], base, _confusion_caption(d)))
    out.append("### Per-class test accuracy\n")
    headers, rows = per_class_table(report.details, report.classes)
    out.append(markdown_table(headers, rows))
    out.append("## Most confident mistakes\n")
    for d in report.details:
        if "mistakes" in figures.arms[d.name]:
            out.append(f"{_mistakes_caption(d)}.\n")
            out.append(_md_image(figures.arms[d.name]["mistakes"], base, f"{d.name} mistakes"))
        else:
            out.append(f"{d.name}: no mistakes to show.\n")
    out.append("## Reproduce\n")
    out.append(f"```sh\n{report.command}\n```\n" if report.command else f"{_no_command_note(report)}\n")
    typed = report.environment.get("command")
    if typed:
        out.append(f"Command as typed: `{typed}`\n")
    environment = _environment_rows(report.environment)
    if environment:
        out.append("### Environment\n")
        out.append(markdown_table(["Key", "Value"], environment, text_columns=(0, 1)))
    out.append("### Configuration (config.toml)\n")
    out.append(f"```toml\n{report.config_text.rstrip()}\n```\n")
    return "\n".join(out)


def _settings_markdown(report: RunAnalysis, figures: Figures) -> list[str]:
    out = ["## Settings\n", settings_intro(report) + "\n"]
    for model in report.settings:
        headers, rows, text = settings_table(model)
        out.append(f"### {model.model}\n")
        out.append(f"**{model.sentence()}**\n")
        out.append(markdown_table(headers, rows, text_columns=text))
        if model.tests:
            out += [f"- {c.sentence()}" for c in model.tests]
            out.append("")
        out.append(settings_note(model) + "\n")
    if figures.settings:
        out.append("### Accuracy against each swept setting\n")
        for key, path in figures.settings.items():
            out.append(f"{settings_caption(key, report)}.\n")
            out.append(_md_image(path, report.folder.path, f"accuracy against {key}"))
    return out

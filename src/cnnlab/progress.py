"""Live training progress: a Rich progress bar in a terminal, one plain line per epoch otherwise."""

from __future__ import annotations

import math
import sys
from typing import TextIO

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cnnlab.results import EpochRecord


def epoch_line(label: str, record: EpochRecord, epochs: int) -> str:
    """One epoch as the notebook's Keras log prints it, plus throughput."""
    return (
        f"{label} epoch {record.epoch}/{epochs} - {record.train_seconds + record.val_seconds:.1f}s - "
        f"loss: {record.loss:.4f} - accuracy: {record.accuracy:.4f} - val_loss: {record.val_loss:.4f} - "
        f"val_accuracy: {record.val_accuracy:.4f} - {record.samples_per_second:,.0f} samples/s"
        + ("" if math.isnan(record.learning_rate) else f" - learning_rate: {record.learning_rate:.4g}")
    )


class PlainReporter:
    """One line per epoch, for logs and pipes."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label, self.stream, self.epochs = label, stream or sys.stdout, 0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epochs = epochs

    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None:
        pass

    def end_epoch(self, record: EpochRecord) -> None:
        print(epoch_line(self.label, record, self.epochs), file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(f"{self.label}: {text}", file=self.stream, flush=True)


class RichReporter:
    """A live bar per epoch (samples/s, loss, accuracy), leaving the epoch's line behind."""

    def __init__(self, label: str, console: Console) -> None:
        self.label, self.console = label, console
        self.progress: Progress | None = None
        self.epochs, self.task, self.samples_per_step = 0, None, 0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self.epochs = epochs
        self.progress = Progress(
            TextColumn(f"[bold]{escape(self.label)}[/] {epoch}/{epochs}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self.progress.start()
        self.task = self.progress.add_task("epoch", total=steps, stats="")

    def update(self, step: int, samples: int, loss: float, accuracy: float) -> None:
        if self.progress is not None:
            elapsed = self.progress.tasks[0].elapsed or 1e-9
            self.progress.update(
                self.task, completed=step, stats=f"loss {loss:.4f} acc {accuracy:.4f} {samples / elapsed:,.0f}/s"
            )

    def end_epoch(self, record: EpochRecord) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.console.print(epoch_line(self.label, record, self.epochs), highlight=False, markup=False)

    def note(self, text: str) -> None:
        self.console.print(f"{self.label}: {text}", highlight=False, markup=False)


def make_reporter(label: str, console: Console, live: bool = True) -> PlainReporter | RichReporter:
    """Rich bars in a terminal, plain lines when output is piped (CI logs stay readable) or when
    `live` is False: units trained together would each keep a live bar going at once, starting and
    stopping out of step, while their epoch lines stay readable."""
    return RichReporter(label, console) if console.is_terminal and live else PlainReporter(label, console.file)

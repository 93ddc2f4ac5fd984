"""The one progress display of training and evaluation: Lightning's tqdm bar family.

:class:`Bar` is Lightning's ``Tqdm`` bar. On a terminal (``sys.stderr.isatty()``) it redraws
itself in place and leaves one final line. Anywhere else (a CI log, a SLURM ``.out`` file,
``2>&1 | tee``) redrawing would write every frame as text, so it writes a plain line instead
every ``every_percent`` % of its total or ``every_seconds`` seconds, whichever comes first,
and the final line once; bars that only show what is going on (the sanity check, validation
during training) write nothing there.

:class:`StepProgressBar` is the Trainer's callback. Every stage here runs one endless (or
single) epoch and stops on a step budget, so Lightning's epoch counter ("Epoch 0/-2") says
nothing: the bar counts optimisation steps against the stage's budget (``trainer.max_steps``
or what the module plans itself), resumed runs from the step they resume at (their rate counts
only the steps of this run), and closes when the budget is reached, before Lightning says why
fitting stopped. Evaluation loops that are not Lightning loops (FSD tallies, sample writing)
use :func:`progress`, the same bar.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Iterator, TextIO

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm

# every bar, in a terminal: desc, bar, count, times, rate (s/it when slower than 1 it/s), metrics
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
# a plain line, total known or not
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
OPEN_LINE_FORMAT = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
EVERY_PERCENT = 10
EVERY_SECONDS = 300
# console loggers whose lines would otherwise land in the middle of a bar being redrawn: the root
# (Hydra's console handler) and Lightning's own (it prints without propagating to the root)
CONSOLE_LOGGERS = ("", "pytorch_lightning")


class _Nowhere:
    """Where a plain-line bar sends tqdm's own redraws."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class Bar(Tqdm):
    """Lightning's tqdm bar on ``stream`` (stderr), drawn in place on a terminal and written as
    periodic plain lines elsewhere (module docstring). ``plain`` forces one or the other."""

    def __init__(self, *args: Any, stream: TextIO | None = None, plain: bool | None = None,
                 every_percent: float = EVERY_PERCENT, every_seconds: float = EVERY_SECONDS, **kwargs: Any):
        self.stream = stream if stream is not None else sys.stderr
        self.plain = (not _isatty(self.stream)) if plain is None else bool(plain)
        self.every_percent, self.every_seconds = float(every_percent), float(every_seconds)
        kwargs.setdefault("bar_format", BAR_FORMAT)
        kwargs.setdefault("dynamic_ncols", True)
        if self.plain:  # tqdm's redraws go nowhere; display(), asked at every update, writes the lines
            kwargs.update(file=_Nowhere(), dynamic_ncols=False, mininterval=0, miniters=1)
        else:
            kwargs.setdefault("file", self.stream)
        initial = kwargs.get("initial", 0) or 0
        self._line_n, self._line_t, self._next_mark = initial, time.time(), None
        super().__init__(*args, **kwargs)
        self._line_t = getattr(self, "start_t", self._line_t)  # a disabled bar has no clock

    # ------------------------------------------------------------ plain lines
    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self.plain:
            return super().display(msg, pos)
        if msg is None and self.leave and self._line_due():
            self._write_line()
        return True

    def close(self) -> None:
        if self.plain and not self.disable and self.leave and self.n != self._line_n:
            self._write_line()  # the final line, unless the last one already showed this count
        super().close()

    def reset(self, total: float | None = None) -> None:
        super().reset(total)
        self._line_n, self._next_mark = self.n, None  # counted afresh (Lightning reuses validation bars)

    def _line_due(self) -> bool:
        if self.n == self._line_n:
            return False
        if self.total:
            if self.n >= self.total:
                return True
            if self._next_mark is None:
                self._next_mark = self._mark_after(self._line_n)
            if self.n >= self._next_mark:
                return True
        return self.every_seconds > 0 and self._time() - self._line_t >= self.every_seconds

    def _mark_after(self, n: float) -> float:
        step = self.total * self.every_percent / 100 if self.every_percent > 0 else math.inf
        return (math.floor(n / step) + 1) * step if math.isfinite(step) and step > 0 else math.inf

    def _write_line(self) -> None:
        fmt = LINE_FORMAT if self.total else OPEN_LINE_FORMAT
        line = self.format_meter(**{**self.format_dict, "bar_format": fmt, "ncols": None})
        self.stream.write(line + "\n")
        self.stream.flush()
        self._line_n, self._line_t = self.n, self._time()
        self._next_mark = self._mark_after(self.n) if self.total else None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


@contextmanager
def logs_above_bars(plain: bool) -> Iterator[None]:
    """On a terminal, console log lines printed while a bar is drawn go above it (tqdm's logging
    redirect) instead of being glued to it; plain lines need nothing of the kind."""
    if plain:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    # only the loggers that print to the console themselves: tqdm gives every logger it is handed a
    # handler, so one that propagates to the root's console handler would print each line twice
    loggers = [logger for logger in map(logging.getLogger, CONSOLE_LOGGERS)
               if any(type(h) is logging.StreamHandler for h in logger.handlers)]
    with logging_redirect_tqdm(loggers=loggers, tqdm_class=Bar):
        yield


@contextmanager
def progress(total: int | None, description: str, initial: int = 0, enabled: bool = True,
             **bar_kwargs: Any) -> Iterator[Bar]:
    """A bar for a loop that is not a Lightning loop: ``with progress(n, "real: scenes") as bar:
    ... bar.update(k)``; one final line when it ends (none when ``enabled`` is false)."""
    bar = Bar(total=total, initial=initial, desc=description, leave=True, disable=not enabled, smoothing=0,
              **bar_kwargs)
    with bar, (logs_above_bars(bar.plain) if enabled else nullcontext()):
        yield bar


def planned_steps(max_steps: int | None, module: Any) -> int | None:
    """The number of optimisation steps a run will take: ``max_steps`` (the trainer's) when set,
    capped by what the module plans itself (the reconstruct stage: steps x chunks), else unknown."""
    own = getattr(module, "total_steps", None)
    own = own if isinstance(own, int) and not isinstance(own, bool) else None
    if max_steps is not None and max_steps >= 0:
        return min(max_steps, own) if own is not None else max_steps
    return own


def step_budget(trainer: pl.Trainer, module: Any) -> int | None:
    """:func:`planned_steps` of a built trainer."""
    return planned_steps(trainer.max_steps, module)


class StepProgressBar(TQDMProgressBar):
    """The Trainer's progress bar: optimisation steps of the stage's step budget (module docstring).
    ``every_percent`` / ``every_seconds``: how often a plain line is written when stderr is not a
    terminal; ``plain`` forces plain lines (true) or a redrawn bar (false)."""

    def __init__(self, refresh_rate: int = 1, every_percent: float = EVERY_PERCENT,
                 every_seconds: float = EVERY_SECONDS, plain: bool | None = None):
        super().__init__(refresh_rate=refresh_rate, leave=False)
        self.lines = {"every_percent": every_percent, "every_seconds": every_seconds, "plain": plain}
        self._logs = ExitStack()

    def _bar(self, description: str, leave: bool, position: int = 0, **kwargs: Any) -> Bar:
        return Bar(desc=description, leave=leave, position=position, disable=self.is_disabled, **self.lines,
                   **kwargs)

    def _train_bar_open(self) -> bool:
        return self._train_progress_bar is not None and not self._train_progress_bar.disable

    # ------------------------------------------------------------ Lightning's bars, as Bars
    def init_sanity_tqdm(self) -> Bar:
        return self._bar(self.sanity_check_description, leave=False)

    def init_train_tqdm(self) -> Bar:
        return self._bar(self.train_description, leave=True, smoothing=0)

    def init_validation_tqdm(self) -> Bar:
        below_training = self.trainer.state.fn != "validate" and self._train_bar_open()
        return self._bar(self.validation_description, leave=self.trainer.state.fn == "validate",
                         position=int(below_training))

    def init_test_tqdm(self) -> Bar:
        return self._bar("Testing", leave=True)

    def init_predict_tqdm(self) -> Bar:
        return self._bar(self.predict_description, leave=True, smoothing=0)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the logger's run id: not progress
        return items

    # ------------------------------------------------------------ the run
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.is_enabled:
            plain = self.lines["plain"] if self.lines["plain"] is not None else not _isatty(sys.stderr)
            self._logs.enter_context(logs_above_bars(plain))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._logs.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._logs.close()  # log handlers back as they were, whatever stopped the run

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = trainer.lightning_module
        name = getattr(module, "stage_name", type(module).__name__)
        self.train_progress_bar = self._bar(f"{name} step", leave=True, smoothing=0,
                                            total=step_budget(trainer, module), initial=trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # one bar over the whole step budget, not one per epoch

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._train_bar_open():
            return
        bar, n = self.train_progress_bar, trainer.global_step
        if self._should_update(n, bar.total):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.n = n
            bar.refresh()
        if bar.total is not None and n >= bar.total:
            bar.close()  # budget reached: the final line now, before Lightning says that fitting stopped

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_bar_open():
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if self._train_bar_open():
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._train_bar_open():
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.close()

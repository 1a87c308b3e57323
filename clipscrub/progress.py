"""Progress of the long stages: a bar on a terminal, plain lines in logs.

    for shard in track(shards, desc="embed", unit="shards"):
        ...

On an interactive terminal (stderr is a TTY, outside a Prefect run) this is a tqdm bar on stderr.
Anywhere else (a pipe, a file, CI, a Prefect flow or task run) it is plain lines, never a carriage
return::

    embed: 0/40 shards (0%), 0:00:00 elapsed
    embed: 12/40 shards (30%), 4800 images, 870 images/s, 0:00:05 elapsed, eta 0:00:12
    embed: done, 40/40 shards (100%), 16000 images, 869 images/s, 0:00:18 elapsed

the first as the loop starts, then at most one every ``every_s`` seconds (default: the
environment variable ``CLIPSCRUB_PROGRESS_EVERY``, else 30; 0: at every step), and always a last
one: ``done, ...`` or, when the loop is left early (an error, a ``break``), ``stopped at ...``.
Inside a Prefect flow or task run the lines are records of its run logger (they show in the
Prefect UI, in that run's logs); elsewhere they are printed to stderr.

``track`` returns a ``Progress``: iterate it for the items (each counts one ``unit`` once the
loop body is done with it). Two more things can be counted on it:

- ``count(n, unit)``: inner units, e.g. the images within shards; the lines then show their
  total and rate (``870 images/s``) instead of the rate of ``unit`` (``tick=False`` leaves the
  line to the step that ends next);
- ``advance(n=1, **info)``: steps by hand, ``info`` shown as ``key value`` on the line.

Without an iterable, ``Progress`` is a context manager counted with ``advance``::

    with Progress(desc="train", total=epochs, unit="epochs", every_s=0) as bar:
        for epoch in range(epochs):
            ...
            bar.advance(loss=round(loss, 4))  # train: 3/10 epochs (30%), loss 4.2104, 14.1 s/epoch, ...
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO

from clipscrub.errors import ParamError

EVERY_ENV = "CLIPSCRUB_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0


def every_seconds(every_s: float | None = None) -> float:
    """Seconds between two progress lines: ``every_s``, else ``$CLIPSCRUB_PROGRESS_EVERY``, else 30."""
    param, raw = ("every_s", every_s) if every_s is not None else (EVERY_ENV, os.environ.get(EVERY_ENV, "").strip())
    if raw == "":
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ParamError(f"expected the seconds between progress lines (a number >= 0), got {raw!r}", param=param)
    return value


def _run_logger() -> Any:
    """The current Prefect flow or task run's logger; None outside a run."""
    if "prefect" not in sys.modules:  # never imported: no run can be going on (and importing it is slow)
        return None
    from prefect import get_run_logger
    from prefect.context import FlowRunContext, TaskRunContext

    if TaskRunContext.get() is None and FlowRunContext.get() is None:
        return None
    return get_run_logger()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _rate(count: int, seconds: float, unit: str) -> str:
    rate = count / seconds
    if rate >= 1:
        return f"{rate:.0f} {unit}/s" if rate >= 10 else f"{rate:.1f} {unit}/s"
    # slow steps read better as seconds each: "14.1 s/epoch", not "0.0709 epochs/s"
    one = unit[:-3] + "y" if unit.endswith("ies") else unit[:-1] if unit.endswith("s") and len(unit) > 1 else unit
    return f"{1 / rate:.1f} s/{one}"


class Progress:
    """Progress of one loop; see the module docstring."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None,
                 unit: str = "it", every_s: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:  # a generator: counts without a total
                pass
        self.desc, self.total, self.unit = desc, total, unit
        self.every_s = every_seconds(every_s)
        self.n = 0
        self.inner = 0
        self.inner_unit: str | None = None
        self.info: dict[str, Any] = {}
        self._iterable = iterable
        self._items: Iterator[Any] | None = None
        self._started = False
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False
        stream = sys.stderr if stream is None else stream
        logger = _run_logger()
        self._bar = None
        if logger is None and _isatty(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
        else:
            self._emit: Callable[[str], None] = (
                logger.info if logger is not None else lambda line: print(line, file=stream, flush=True))
            self._emit(self.line(self._start))

    # iterating: one step per item, counted once the loop body is done with it
    def __iter__(self) -> Iterator[Any]:
        # the generator itself, not kept here: a loop left early drops its last reference, so
        # the "stopped at" line comes at once, not at the next garbage collection
        return self._steps()

    def __next__(self) -> Any:  # next() by hand: the generator is kept (and closed with this object)
        if self._items is None:
            self._items = self._steps()
        return next(self._items)

    def _steps(self) -> Iterator[Any]:
        if self._iterable is None or self._started:
            raise TypeError(f"progress {self.desc!r} has no iterable, or is iterated already")
        self._started = True
        try:
            for item in self._iterable:  # type: ignore[union-attr]
                yield item
                self.advance()
        except BaseException:  # the iterable failed, or the loop was left (GeneratorExit)
            self.close(stopped=True)
            raise
        self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(stopped=exc_type is not None)

    def advance(self, n: int = 1, **info: Any) -> None:
        """``n`` more steps of ``unit``; ``info`` (loss=4.21) is shown on the lines from now on."""
        self.n += n
        self.info.update(info)
        self._tick()

    def count(self, n: int, unit: str, *, tick: bool = True) -> None:
        """``n`` more inner units (``unit``: "images"), e.g. as each batch of a shard is done.
        ``tick=False``: only add them, for the step that ends next to show (a chunk's rows, counted
        as the chunk ends: a line between the two would count the rows but not the chunk)."""
        self.inner += n
        self.inner_unit = unit
        if tick:
            self._tick()

    def _tick(self) -> None:
        if self._closed:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(self._extras(self._clock() - self._start)), refresh=False)
            self._bar.update(self.n - self._bar.n)
            return
        now = self._clock()
        if self.total is not None and self.n >= self.total:  # the "done" line follows: it says this
            return
        if now - self._last >= self.every_s:
            self._last = now
            self._emit(self.line(now))

    def _extras(self, elapsed: float) -> list[str]:
        """Inner count, rate and info: what a line shows after the step count."""
        parts = [f"{self.inner} {self.inner_unit}"] if self.inner_unit else []
        parts += [f"{k} {v}" for k, v in self.info.items()]
        count, unit = (self.inner, self.inner_unit) if self.inner_unit else (self.n, self.unit)
        if elapsed > 0 and count > 0:
            parts.append(_rate(count, elapsed, unit))
        return parts

    def line(self, now: float | None = None, *, end: str | None = None) -> str:
        """The progress line at ``now``; ``end``: "done" or "stopped at" for the last one."""
        elapsed = (self._clock() if now is None else now) - self._start
        steps = f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"
        if self.total:
            steps += f" ({100 * self.n // self.total}%)"
        parts = [steps, *self._extras(elapsed), f"{_clock(elapsed)} elapsed"]
        if end is None and self.total and 0 < self.n < self.total:
            parts.append(f"eta {_clock(elapsed * (self.total - self.n) / self.n)}")
        head = {None: "", "done": "done, ", "stopped at": "stopped at "}[end]
        return f"{self.desc}: {head}{', '.join(parts)}"

    def close(self, *, stopped: bool = False) -> None:
        """The last line (or the bar's last state); later calls do nothing."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.set_postfix_str(", ".join(self._extras(self._clock() - self._start)), refresh=False)
            self._bar.close()
        else:
            self._emit(self.line(end="stopped at" if stopped else "done"))


def track(iterable: Iterable[Any], *, desc: str, total: int | None = None, unit: str = "it",
          every_s: float | None = None) -> Progress:
    """The items of ``iterable``, with progress (module docstring); ``total`` defaults to its len()."""
    return Progress(iterable, desc=desc, total=total, unit=unit, every_s=every_s)

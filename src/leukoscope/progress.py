"""Progress on stderr: a tqdm bar on a terminal, one line per stage in a pipe or a log file.

tqdm redraws its bar with carriage returns; in a log those become thousands of lines, and nested
bars (epochs, then batches) multiply them. Off a terminal, a bar that is kept (``leave=True``)
prints one line when its stage ends, ``set_postfix`` prints one line per call (one per epoch in
training), and transient inner bars (``leave=False``) print nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 image', '2 images', '1 leukocyte', '3 leukocytes'."""
    regular = noun + ("es" if noun.endswith(("s", "sh", "tch", "x", "z")) else "s")  # batches, but epochs
    return f"{n:,} {noun if n == 1 else many or regular}"


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "it", leave: bool = True,
             disable: bool = False, log: bool | None = None) -> Any:
    """A progress bar over ``iterable``; ``log`` (default: ``leave``) prints the stage's line off a terminal."""
    if disable or sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable)
    return _Lines(iterable, desc, total, unit, leave if log is None else log)


def note(message: str) -> None:
    """A message on stderr that does not break a progress bar."""
    tqdm.write(message, file=sys.stderr)


class _Lines:
    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, leave: bool):
        self.iterable, self.desc, self.unit, self.leave = iterable, desc, unit, leave
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.n, self.started = 0, time.perf_counter()

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.n += 1
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, **values: Any) -> None:
        if self.leave:
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n + 1}{of} " + " ".join(f"{k}={v}" for k, v in values.items()), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.leave and self.iterable is not None:
            print(f"{self.desc}: {plural(self.n, self.unit) if self.unit != 'it' else self.n} in {time.perf_counter() - self.started:.1f} s",
                  file=sys.stderr, flush=True)
            self.iterable = None  # print once

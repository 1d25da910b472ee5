"""Progress bars for long work; silenced by ``--quiet`` or ``ASTRID_QUIET=1``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet or os.environ.get("ASTRID_QUIET", "") not in ("", "0")


def new_bar(with_status: bool = False):
    """A Rich progress bar on stderr (description, bar, n/total, elapsed, remaining and, with
    ``with_status``, a ``status`` field for live numbers); None when quiet."""
    if is_quiet():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if with_status:
        columns.append(TextColumn("{task.fields[status]}"))
    return Progress(*columns, console=Console(stderr=True), transient=False)


def track(items: Iterable[T], description: str = "working", total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` with a Rich progress bar on stderr unless quiet."""
    bar = new_bar()
    if bar is None:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)

"""Progress bars only where a person watches: a terminal, and not --quiet."""

from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def show_progress(quiet: bool = False) -> bool:
    return not quiet and sys.stderr.isatty()


def progress(iterable: Iterable | None, desc: str, quiet: bool = False, **kwargs) -> tqdm:
    return tqdm(iterable, desc=desc, disable=not show_progress(quiet), dynamic_ncols=True, **kwargs)

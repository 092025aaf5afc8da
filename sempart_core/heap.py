"""Start-up of long-lived workers without CPython's cyclic garbage collector.

Importing torch and timm and building a model create hundreds of thousands of objects
that live as long as the process. The collector traverses them again and again while
they pile up, and at every full collection afterwards: about 2 of the 5 CPU-s that an
inference actor spends before its first image (a tiny model, measured). `long_lived()`
pauses the collector while they are made and then freezes them (`gc.freeze`: the
permanent generation, which collections skip), so each worker pays for them once.
"""
from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def long_lived() -> Iterator[None]:
    """Make what lives as long as the process (imports, the model) inside this block.

    Garbage from before the block is collected first, so that only what the block made
    is frozen with what was there (cheap in a fresh process; in a long one, such as a
    test session, collections skip what earlier blocks froze)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()

"""Host-to-device copies that overlap compute: pinned buffers, non-blocking copies on a
side stream, and the next batch's copy started before the current batch is computed.

    for x in prefetch(host_batches, DeviceCopier("cuda")):
        model(x)            # batch i computes while batch i+1 is being copied

On a CPU device the copier returns its input and the loop is a plain loop.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


def prefetch(batches: Iterable[T], start: Callable[[T], Callable[[], U]]) -> Iterator[U]:
    """Yield each batch's result, having called `start` on the next batch first.

    `start(batch)` begins a transfer and returns a function that waits for it and
    gives the result; so while the caller computes on batch i, batch i+1 is in flight.
    """
    it = iter(batches)
    try:
        pending = start(next(it))
    except StopIteration:
        return
    for batch in it:
        following = start(batch)
        yield pending()
        pending = following
    yield pending()


class DeviceCopier:
    """`start` for `prefetch`: copies a CPU tensor to `device` without blocking.

    On CUDA the tensor is copied into pinned memory (the copy engine reads it directly)
    and sent on a side stream; waiting makes the compute stream wait on that copy (an
    event, not a host sync) and records the tensor's use there so its memory is not
    reused too early.
    """

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, host: torch.Tensor) -> Callable[[], torch.Tensor]:
        if self.stream is None or host.device.type != "cpu":  # nothing to copy, or already there
            moved = host.to(self.device)
            return lambda: moved
        pinned = host if host.is_pinned() else host.pin_memory()
        with torch.cuda.stream(self.stream):
            moved = pinned.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)

        def wait() -> torch.Tensor:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            moved.record_stream(current)
            return moved

        return wait

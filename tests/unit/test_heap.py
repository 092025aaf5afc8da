"""heap.long_lived: what the block makes is frozen, garbage from before is not, and the
collector is left as it was."""
import gc
import weakref

from sempart_core.heap import long_lived


class Node:
    pass


def cycle() -> weakref.ref:
    """A garbage reference cycle (only the collector frees it); a weak reference to it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_block_objects_are_frozen_and_earlier_garbage_is_freed() -> None:
    gc.disable()  # the earlier garbage stays until long_lived collects it
    try:
        earlier = cycle()
        frozen_before = gc.get_freeze_count()
        with long_lived():
            assert earlier() is None  # collected on the way in, not frozen
            assert not gc.isenabled()
            kept = [Node() for _ in range(100)]
        assert gc.get_freeze_count() >= frozen_before + len(kept)
        assert not gc.isenabled()  # as it was
    finally:
        gc.enable()
    with long_lived():
        pass
    assert gc.isenabled()

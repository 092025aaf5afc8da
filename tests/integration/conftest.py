"""Fixtures of the integration tests (helpers they import live beside: processes.py, multinode.py)."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import kill, process_tree, processes_mentioning


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    """A short private RAY_TMPDIR for a test's own local Ray (Ray puts unix sockets under
    it: paths must stay short); its processes are killed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="sj", dir="/tmp"))
    try:
        yield folder
    finally:
        kill(sorted({pid for p in processes_mentioning(str(folder)) for pid in process_tree(p)} - {os.getpid()}))
        shutil.rmtree(folder, ignore_errors=True)

"""Import a script of the repository (benchmarks/, jobs/) by its path: those folders hold
scripts, not packages."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(path: Path, name: str) -> ModuleType:
    """The script at `path` as module `name`, registered in sys.modules (dataclasses
    resolve their annotations through it), its folder on sys.path as when it runs (the
    benchmarks import helpers beside them, such as timing.py)."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

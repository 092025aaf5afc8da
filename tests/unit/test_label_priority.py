"""The light label stages yield the CPU to the model: `lower_priority` only ever raises niceness."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def niceness_after(*requests: int) -> int:
    """The niceness of a fresh process after calling lower_priority with each request."""
    code = "import os\nfrom pipeline.label import lower_priority\n"
    code += "".join(f"lower_priority({r})\n" for r in requests) + "print(os.nice(0))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_lower_priority_raises_niceness_and_never_lowers_it():
    base = os.nice(0)
    assert niceness_after(0) == base
    assert niceness_after(base + 5) == base + 5
    assert niceness_after(base + 5, base + 5) == base + 5  # a pooled worker asked again
    assert niceness_after(base + 5, base + 2) == base + 5

"""`ray job submit --working-dir . -- python jobs/train_job.py --config jobs/configs/X.yaml FLAGS`.

Runs the `sempart train` command itself, so the flags cannot drift apart: `--config`
is the SEMPART config YAML (backbone, model, loss, data and train sections) and the
flags on the command line override it. Inside a Ray job RAY_ADDRESS is set, so the run
joins the cluster instead of starting a local Ray.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir

from pipeline.cli import app  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    train = typer.main.get_command(app).commands["train"]
    train.main(args=argv, prog_name="train_job.py")


if __name__ == "__main__":
    main()

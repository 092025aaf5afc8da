"""`ray job submit --working-dir . -- python jobs/label_job.py [--config FILE.yaml] FLAGS`.

The flags are those of `sempart label` (the same click command runs, so they cannot
drift apart); `--config` names a YAML file whose keys are the same option names
(`batch-size` or `batch_size`), and flags on the command line override it. Inside a
Ray job RAY_ADDRESS is set, so the run joins the cluster instead of starting Ray.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import typer
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working dir

from pipeline.cli import app  # noqa: E402


def load_defaults(path: str | None) -> dict:
    """The YAML's options as click defaults (keys with '-' or '_')."""
    if path is None:
        return {}
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    known, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    label = typer.main.get_command(app).commands["label"]
    label.main(args=rest, prog_name="label_job.py", default_map=load_defaults(known.config))


if __name__ == "__main__":
    main()

"""`sempart ...`: the command line (DESIGN.md, "Command line" is the contract).

Each command is a thin wrapper: parse flags, call the module that does the work, turn
user errors into one line on stderr and an exit code (0 ok, 1 partial, 2 usage).
"""
from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from sempart_core.config import SempartConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
logger = logging.getLogger("sempart")

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A user error: bad flag, missing input, unreadable config."""


def fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn):
    """Turn the errors users can fix into one line and exit 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UsageError, ValueError, FileNotFoundError, PermissionError) as exc:
            fail(f"{type(exc).__name__}: {exc}".splitlines()[0] if not isinstance(exc, UsageError) else str(exc))

    return wrapper


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_config(
    config_file: Optional[Path] = None,
    backbone: Optional[str] = None,
    weights: Optional[str] = None,
    image_size: Optional[int] = None,
) -> SempartConfig:
    """Config file (if any), then flags on top."""
    cfg = load_config(config_file) if config_file else SempartConfig()
    if backbone:
        cfg.backbone.name = backbone
    if weights:
        cfg.backbone.weights = weights
    if image_size:
        cfg.data.image_size = image_size
    return cfg


@app.command("init-model")
@user_errors
def init_model(
    out: str = typer.Option(..., "--out", help="Model folder to write (path or s3:// URI)."),
    backbone: Optional[str] = typer.Option(None, help="timm ViT name [default: vit_small_patch8_224.dino]."),
    weights: Optional[str] = typer.Option(None, help="hub | random | PATH | URI [default: hub]."),
    image_size: Optional[int] = typer.Option(None, help="Shorter side fed to the backbone [default: 320]."),
    config: Optional[Path] = typer.Option(None, help="YAML/JSON config file."),
    seed: int = typer.Option(0, help="Seed of the (untrained) heads."),
) -> None:
    """Write an untrained model artifact (for TokenCut eval, tests and pipeline checks)."""
    from sempart_core.artifact import meta_for_backbone, save_artifact
    from sempart_core.model import build_model

    cfg = build_config(config, backbone, weights, image_size)
    bb, heads = build_model(cfg, seed=seed)
    model_id = save_artifact(out, cfg, heads, bb, meta_for_backbone(bb))
    typer.echo(f"model {model_id[:12]} written to {out} (random_backbone: {str(bb.random_weights).lower()})")


@app.command("eval")
@user_errors
def eval_cmd(
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth masks (PNG, >127 = object)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or URI (with --images)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images to predict."),
    pred: Optional[Path] = typer.Option(None, "--pred", help="Folder of predicted maps (PNG/.npy)."),
    method: str = typer.Option("sempart", help="sempart | tokencut (TokenCut on the model's backbone)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the precision-recall curve PNG."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most N images."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
) -> None:
    """Score masks like the salient-object literature: Acc, IoU, MAE, maxF (both conventions)."""
    from pipeline.evaluate import evaluate_dirs, evaluate_model, write_pr_plot, write_report

    if (pred is None) == (model is None) or (model is not None and images is None):
        raise UsageError("give either --pred DIR, or --model MODEL with --images DIR")
    if pred is not None:
        report = evaluate_dirs(pred, gt)
    else:
        from sempart_core.predictor import load_predictor

        predictor = load_predictor(model, method=method, batch_size=batch_size)
        report = evaluate_model(predictor, images, gt, limit=limit)
    if json_out:
        write_report(report, json_out)
    if plot:
        write_pr_plot(report, plot)
    scalars = {k: v for k, v in report.items() if not isinstance(v, (list, dict))}
    typer.echo(json.dumps(scalars, indent=2))


if __name__ == "__main__":
    app()

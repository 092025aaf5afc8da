"""`sempart ...`: the command line (docs/design.md, "Command line" is the contract).

Each command is a thin wrapper: parse flags, call the module that does the work, turn
user errors into one line on stderr and an exit code (0 ok, 1 partial, 2 usage).
"""
from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from sempart_core.batching import DEFAULT_MAX_BATCH_TOKENS
from sempart_core.config import SempartConfig, load_config
from sempart_core.heap import long_lived

# Ray only where a command starts or joins it (cluster.init_ray): Ray's automatic connection
# would let a stopped pipeline's threads start or join Ray again as the process exits.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")

# Plain tracebacks: typer's rich ones print local variables, which may hold secrets.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0], pretty_exceptions_enable=False
)
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
    from sempart_core.artifact import save_untrained_artifact

    cfg = build_config(config, backbone, weights, image_size)
    model_id = save_untrained_artifact(out, cfg, seed=seed)
    random_backbone = cfg.backbone.weights == "random"
    typer.echo(f"model {model_id[:12]} written to {out} (random_backbone: {str(random_backbone).lower()})")


@app.command("eval")
@user_errors
def eval_cmd(
    gt: Optional[Path] = typer.Option(None, "--gt", help="Folder of ground-truth masks (PNG; binarised by --gt-binarize)."),
    boxes: Optional[Path] = typer.Option(None, "--boxes", help="Ground-truth boxes for CorLoc: a VOC Annotations folder or a COCO .json."),
    coco20k_list: Optional[Path] = typer.Option(None, "--coco20k-list", help="coco_20k_filenames.txt (LOST/TokenCut): score exactly the COCO20k images of a COCO train2014 --boxes JSON."),
    gt_binarize: str = typer.Option("half", "--gt-binarize", help="half: GT > 127 (classic SOD) | nonzero: any non-zero GT pixel (TokenCut's code)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model folder or URI (with --images)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images to predict."),
    pred: Optional[str] = typer.Option(None, "--pred", help="Folder of predicted maps (PNG/.npy), at the image's size for --boxes; with --instances the --out of `sempart label --instances N`."),
    instances: bool = typer.Option(False, "--instances", help="Score instances against --gt-coco: class-agnostic COCO AP, AP50, AP75, AR1/10/100 of boxes and masks (--model: MaskCut's defaults, up to 3 per image)."),
    gt_coco: Optional[Path] = typer.Option(None, "--gt-coco", help="COCO instances JSON for --instances; images matched by file name."),
    method: str = typer.Option("sempart", help="sempart | tokencut (TokenCut as published, on the model's backbone) | tokencut-bs (TokenCut + bilateral solver)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the precision-recall curve PNG."),
    limit: Optional[int] = typer.Option(None, help="Evaluate at most N images."),
    batch_size: int = typer.Option(8, help="Images per forward pass."),
    max_batch_tokens: int = typer.Option(
        DEFAULT_MAX_BATCH_TOKENS, "--max-batch-tokens",
        help="Most backbone tokens in one model call; a call out of memory is split in halves."),
) -> None:
    """Score masks like the salient-object literature (Acc, IoU, MAE, maxF both conventions;
    coarse and fine, border rule on and off), boxes like object discovery (CorLoc), and
    instances like unsupervised instance segmentation (class-agnostic COCO AP and AR)."""
    from pipeline.annotations import read_boxes
    from pipeline.evaluate import GT_BINARIZE, evaluate_dirs, evaluate_model, format_report, write_pr_plot, write_report
    from pipeline.instance_eval import evaluate_model_instances, evaluate_table, format_instance_report
    from sempart_core.batching import ImageOutOfMemory
    from sempart_core.config import InstanceConfig

    if (pred is None) == (model is None) or (model is not None and images is None):
        raise UsageError("give either --pred DIR, or --model MODEL with --images DIR")
    if instances or gt_coco is not None:
        others = [v for v in (gt, boxes, coco20k_list, plot) if v is not None]
        if not (instances and gt_coco is not None) or others:
            raise UsageError("--instances scores against --gt-coco COCO.json alone: give both, without "
                             "--gt, --boxes, --coco20k-list or --plot")
    elif gt is None and boxes is None:
        raise UsageError("give --gt MASKS and/or --boxes ANNOTATIONS")
    if coco20k_list is not None and boxes is None:
        raise UsageError("--coco20k-list selects images of --boxes COCO.json: give both")
    if gt_binarize not in GT_BINARIZE:
        raise UsageError(f"--gt-binarize: use one of {', '.join(GT_BINARIZE)}, not {gt_binarize!r}")
    if plot is not None and gt is None:
        raise UsageError("--plot needs --gt: the PR curve is over masks")
    if max_batch_tokens < 1:
        raise UsageError(f"--max-batch-tokens must be at least 1, got {max_batch_tokens}")
    gt_boxes = read_boxes(boxes, coco20k_list) if boxes is not None else None
    if pred is not None:
        report = (evaluate_table(gt_coco, pred, limit) if instances
                  else evaluate_dirs(pred, gt, boxes=gt_boxes, gt_binarize=gt_binarize))
    else:
        from sempart_core.predictor import load_predictor

        predictor = load_predictor(model, method=method, batch_size=batch_size,
                                   instances=InstanceConfig() if instances else None)
        predictor.max_batch_tokens = max_batch_tokens
        try:
            report = (evaluate_model_instances(predictor, images, gt_coco, limit) if instances
                      else evaluate_model(predictor, images, gt, boxes=gt_boxes, limit=limit, gt_binarize=gt_binarize))
        except ImageOutOfMemory as exc:
            raise UsageError(f"{exc}: lower --max-batch-tokens or use a bigger device") from exc
    if json_out:
        write_report(report, json_out)
    if plot:
        write_pr_plot(report, plot)
    typer.echo(format_instance_report(report) if instances else format_report(report))
    scalars = {k: v for k, v in report.items() if not isinstance(v, list)}
    typer.echo(json.dumps(scalars))


@app.command("query")
@user_errors
def query_cmd(
    out: str = typer.Argument(..., help="The --out of `sempart label` (path or s3:// URI)."),
    sql: str = typer.Argument(..., help='One SELECT over the table named labels, e.g. "SELECT status, count(*) FROM labels GROUP BY 1".'),
    fmt: str = typer.Option("table", "--format", help="table | csv | json (JSON Lines, one object per row)."),
    limit: Optional[int] = typer.Option(None, help="Return at most N rows."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL (else AWS_ENDPOINT_URL)."),
    s3_anon: bool = typer.Option(False, "--s3-anon", help="Anonymous S3 access."),
) -> None:
    """Run read-only SQL over the labels table with DuckDB (no extension downloads)."""
    from pipeline.query import format_table, query_batches, run_query, write_csv, write_json_lines
    from pipeline.storage import configure_s3

    if fmt not in ("table", "csv", "json"):
        raise UsageError(f"--format must be table, csv or json, got {fmt!r}")
    configure_s3(s3_endpoint, s3_anon)
    if fmt == "table":
        typer.echo(format_table(run_query(out, sql, limit=limit)))
        return
    if limit is not None:
        batches = iter(run_query(out, sql, limit=limit).to_batches())
    else:
        batches = query_batches(out, sql)
    if fmt == "csv":
        write_csv(batches, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    else:
        write_json_lines(batches, sys.stdout)


@app.command("export")
@user_errors
def export_cmd(
    out: str = typer.Argument(..., help="The --out of `sempart label` (path or s3:// URI)."),
    coco: Optional[Path] = typer.Option(None, "--coco", help="Write COCO instances JSON to this file."),
    masks: Optional[Path] = typer.Option(None, "--masks", help="Write one PNG mask per image into this folder."),
    gallery: Optional[Path] = typer.Option(None, "--gallery", help="Write an HTML review gallery into this folder."),
    where: Optional[str] = typer.Option(None, "--where", help='SQL predicate on the labels table, e.g. "score > 0.8".'),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help="S3 endpoint URL (else AWS_ENDPOINT_URL)."),
    s3_anon: bool = typer.Option(False, "--s3-anon", help="Anonymous S3 access."),
) -> None:
    """Export labels as COCO JSON, PNG masks or an HTML gallery (each given target in turn)."""
    from pipeline.export import export_coco, export_gallery, export_masks
    from pipeline.storage import configure_s3

    targets = [(fn, dest) for fn, dest in ((export_coco, coco), (export_masks, masks), (export_gallery, gallery)) if dest]
    if not targets:
        raise UsageError("give --coco FILE.json, --masks DIR or --gallery DIR")
    configure_s3(s3_endpoint, s3_anon)
    for fn, dest in targets:
        typer.echo(fn(out, dest, where=where).line())


S3_ENDPOINT_HELP = "S3 endpoint URL (else AWS_ENDPOINT_URL)."
S3_ANON_HELP = "Read S3 without credentials (public buckets)."


@app.command("manifest")
@user_errors
def manifest_cmd(
    src: str = typer.Argument(..., help="Folder, file:// or s3:// prefix of images (S3: listed in parallel)."),
    out: str = typer.Option(..., "--out", help="Manifest Parquet to write (path or s3:// URI)."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help=S3_ENDPOINT_HELP),
    s3_anon: bool = typer.Option(False, "--s3-anon", help=S3_ANON_HELP),
) -> None:
    """List images once (streamed, S3 prefixes in parallel) into a manifest: uri, image_id,
    size, etag. `label --input MANIFEST.parquet` then lists nothing."""
    import time

    from pipeline.manifest import build_manifest
    from pipeline.storage import configure_s3, redact

    configure_s3(s3_endpoint, s3_anon)
    start = time.perf_counter()
    count = build_manifest(src, out)
    seconds = time.perf_counter() - start
    typer.echo(f"manifest: {count} images -> {redact(out)} in {seconds:.1f} s ({count / max(seconds, 1e-9):.0f} keys/s)")


@app.command("label")
@user_errors
def label_cmd(
    model: str = typer.Option(..., "--model", help="Model folder or URI."),
    input: str = typer.Option(..., "--input", help="Folder/prefix of images, manifest .parquet, text file of URIs, WebDataset .tar shards (folder/prefix, {00000..00099} pattern or list), or Parquet files of image bytes."),
    out: str = typer.Option(..., "--out", help="Output folder/prefix; the table is OUT/part-*.parquet."),
    resume: bool = typer.Option(False, "--resume", help="Finish the interrupted run in OUT."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="With --resume: label the run's error rows again, rewriting their part files in place."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per model call."),
    max_batch_tokens: int = typer.Option(DEFAULT_MAX_BATCH_TOKENS, "--max-batch-tokens", help="Backbone tokens (patches) per model call, all images together (default sized for ViT-S/8 on a 24 GB GPU); a batch out of memory is split in halves."),
    actors: Optional[int] = typer.Option(None, "--actors", help="Inference actors (default: one per GPU; on CPU one single-threaded actor per CPU)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="One GPU per actor (default: if the cluster has GPUs)."),
    rows_per_file: Optional[int] = typer.Option(None, "--rows-per-file", help="Rows per Parquet file (default: 1000)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Label only the first N images of the input."),
    image_column: Optional[str] = typer.Option(None, "--image-column", help="Parquet input: column of image bytes (binary or struct with 'bytes'; default: image, jpg, img or bytes)."),
    id_column: Optional[str] = typer.Option(None, "--id-column", help="Parquet input: column of image ids (default: sha1 of the uri)."),
    decode: Optional[str] = typer.Option(None, "--decode", help="gpu: the inference actors read the images and decode JPEGs on their device; cpu: decode with PIL in CPU tasks (default: gpu with --gpu, else cpu)."),
    finish: Optional[str] = typer.Option(None, "--finish", help="device: resize, threshold, box and score the maps where the model ran, the CPUs only compress and write (default with --gpu); cpu: in CPU tasks."),
    instances: Optional[int] = typer.Option(None, "--instances", help="Up to N objects per image in the instances column (MaskCut; default 0: none). Fixed per run."),
    instances_from: Optional[str] = typer.Option(None, "--instances-from", help="maskcut: MaskCut's cuts alone (default); sempart: the model's own mask first, then cuts over the rest."),
    stall_timeout: float = typer.Option(
        300.0, "--stall-timeout", min=1.0, envvar="SEMPART_STALL_TIMEOUT",
        help="Seconds without any labelled row before the run stops and exits 1, naming what to --resume.",
    ),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help=S3_ENDPOINT_HELP),
    s3_anon: bool = typer.Option(False, "--s3-anon", help=S3_ANON_HELP),
) -> None:
    """Label images with a model on Ray Data: one row per image in OUT/part-*.parquet.

    Exit code 0 when every image was labelled, 1 when some rows are errors, 2 for usage errors.
    """
    from pipeline.cluster import shutdown_quietly
    from pipeline.storage import configure_s3

    with long_lived():  # Ray, Ray Data, pyarrow: the driver's imports, once
        import ray.data

        from pipeline.label import IncompleteRunError, LabelOptions, run_label

    configure_s3(s3_endpoint, s3_anon)
    try:
        summary = run_label(
            LabelOptions(model=model, input=input, out=out, resume=resume, batch_size=batch_size, actors=actors,
                         gpu=gpu, rows_per_file=rows_per_file, limit=limit, retry_errors=retry_errors,
                         max_batch_tokens=max_batch_tokens, image_column=image_column, id_column=id_column,
                         decode=decode, stall_timeout=stall_timeout, instances=instances,
                         instances_from=instances_from, finish=finish)
        )
    except IncompleteRunError as exc:
        typer.echo(f"error: {exc}", err=True)
        shutdown_quietly()  # nothing is printed after that line
        raise typer.Exit(EXIT_PARTIAL) from None
    typer.echo(summary.line())
    raise typer.Exit(summary.exit_code)


@app.command("train")
@user_errors
def train_cmd(
    data: str = typer.Option(..., "--data", help="Folder/prefix of images, manifest .parquet, or text file of URIs."),
    out: str = typer.Option(..., "--out", help="RUN_ROOT: runs live in RUN_ROOT/RUN (path or s3:// URI)."),
    name: str = typer.Option(..., "--name", help="RUN: the same RUN_ROOT and RUN again resumes the run."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML/JSON config file."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Training workers (default: one per GPU, or 1)."),
    gpu: Optional[bool] = typer.Option(None, "--gpu/--no-gpu", help="One GPU per worker (default: if the cluster has GPUs)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimisation steps in all (default: 40000)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch, split over the workers (default: 8)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="timm ViT name (default: vit_small_patch8_224.dino)."),
    weights: Optional[str] = typer.Option(None, "--weights", help="hub | random | PATH | URI (default: hub)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training crop side (default: 320)."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default: 1000)."),
    s3_endpoint: Optional[str] = typer.Option(None, "--s3-endpoint", help=S3_ENDPOINT_HELP),
    s3_anon: bool = typer.Option(False, "--s3-anon", help=S3_ANON_HELP),
) -> None:
    """Train SEMPART on Ray Train; writes checkpoints and RUN_ROOT/RUN/model/."""
    from pipeline.storage import configure_s3

    with long_lived():  # torch, timm, Ray Train: the driver's imports, once
        from pipeline.train import TrainJob, run_training

    cfg = build_config(config, backbone, weights, image_size)
    for field_name, value in (("steps", steps), ("batch_size", batch_size), ("checkpoint_every", checkpoint_every)):
        if value is not None:
            if value < 1:
                raise UsageError(f"--{field_name.replace('_', '-')} must be at least 1, got {value}")
            setattr(cfg.train, field_name, value)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    configure_s3(s3_endpoint, s3_anon)
    summary = run_training(TrainJob(data=data, out=out, name=name, config=cfg, workers=workers, gpu=gpu))
    typer.echo(summary.line())


@app.command("demo")
@user_errors
def demo_cmd(
    workdir: Path = typer.Option(Path("demo-work"), "--workdir", help="Where the table, gallery and model are copied."),
) -> None:
    """Local S3 + local Ray: train a few steps, label sample photos, query, gallery."""
    from pipeline.demo import run_demo

    result = run_demo(workdir)
    if result.random_backbone:
        typer.echo("NOTE: random backbone (no pretrained weights could be downloaded): masks are not meaningful")
    typer.echo(f"Parquet table: {result.table.resolve()}/part-*.parquet")
    typer.echo(f"gallery:       {result.gallery.resolve()}")
    typer.echo(f"model:         {result.model.resolve()}")


if __name__ == "__main__":
    app()

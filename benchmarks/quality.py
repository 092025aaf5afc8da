"""The quality table: a trained model on the standard benchmarks, next to published figures.

Evaluates MODEL with SEMPART (fine and coarse map, border rule on and off), and TokenCut
and TokenCut + bilateral solver on the same backbone and image size, on whichever
datasets are given, each folder in its official release layout:

    --duts-te DIR     DUTS-TE-Image/, DUTS-TE-Mask/
    --ecssd DIR       images/, ground_truth_mask/
    --dut-omron DIR   DUT-OMRON-image/, pixelwiseGT-new-PNG/
    --voc07 DIR       VOCdevkit/VOC2007/ with JPEGImages/, Annotations/ (and
                      ImageSets/Main/trainval.txt, which limits it to trainval)
    --voc12 DIR       VOCdevkit/VOC2012/, the same
    --coco20k DIR     images (images/train2014/, train2014/ or images/) and one COCO
                      train2014 instances JSON (in DIR or DIR/annotations/), with
    --coco20k-list F  the list of the 19,817 COCO20k images: coco_20k_filenames.txt, from
                      LOST's or TokenCut's repository (datasets/coco_20k_filenames.txt);
                      without it no run is called COCO20k
    --coco-val DIR    COCO 2017: val2017/*.jpg and annotations/instances_val2017.json;
                      the model's MaskCut instances (up to 3 per image), scored as
                      class-agnostic COCO AP / AR of boxes and masks (`sempart eval
                      --instances`), next to MaskCut's and CutLER's published figures

Salient-object datasets give Acc / IoU / maxF (both max-F conventions, see
`sempart_core.metrics`), GT binarised by `--gt-binarize` (half: > 127, the default;
nonzero: TokenCut's code); VOC and COCO20k give CorLoc (a COCO20k image without a
non-crowd box counts as a miss, as in TokenCut's loop). Published rows carry their
source; figures not sourced here are shown as "n/a", not guessed.

    python benchmarks/quality.py --model runs/model --duts-te data/DUTS-TE --ecssd data/ECSSD
    python benchmarks/quality.py --model runs/model --coco-val data/coco
    python benchmarks/quality.py --quick   # random tiny backbone on the shipped photos

Prints the table, then as its last line one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.annotations import BoxSet, read_coco_boxes, read_image_list, read_voc_boxes
from pipeline.evaluate import GT_BINARIZE, evaluate_model
from pipeline.instance_eval import STATS, evaluate_model_instances
from sempart_core.artifact import read_artifact, save_untrained_artifact
from sempart_core.config import InstanceConfig, SempartConfig
from sempart_core.predictor import predictor_from_artifact

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.quality")

SHIPPED_DUTS_TE = REPO / "tests" / "data" / "duts-te"
QUICK_MODEL = {"backbone": "vit_tiny_patch16_224", "image_size": 64}
METHODS = ("sempart", "tokencut", "tokencut-bs")
SOD = ("DUTS-TE", "ECSSD", "DUT-OMRON")
CORLOC = ("VOC07", "VOC12", "COCO20k")
NA = None  # a published figure not sourced here

TOKENCUT_README = "github.com/YangtaoWANG95/TokenCut README (paper: Wang et al., CVPR 2022, arXiv:2202.11539)"


@dataclass(frozen=True)
class Published:
    """A published row: (Acc, IoU, maxF) per SOD dataset in %, CorLoc per dataset in %.

    ``variant`` names what was run (backbone, single or multi mode, bilateral solver or
    not) and ``source`` where the figures were read, or why there are none. ``maxf``
    says which max-F convention the row's maxF is: ``maxF_dataset`` (one threshold for
    the dataset, beta^2 0.3), ``maxF_image`` (best threshold per image) or ``unknown``.
    """

    name: str
    variant: str
    source: str
    maxf: str
    sod: dict[str, tuple[float, float, float] | None]
    corloc: dict[str, float | None]


PUBLISHED = (
    Published("TokenCut", "ViT-S/16 (DINO), no bilateral solver",
              f"{TOKENCUT_README}: saliency table of section 4.2, CorLoc of section 4.1", "maxF_dataset",
              {"DUTS-TE": (90.3, 57.6, 67.2), "ECSSD": (91.8, 71.2, 80.3), "DUT-OMRON": (88.0, 53.3, 60.0)},
              {"VOC07": 68.8, "VOC12": 72.1, "COCO20k": 58.8}),
    Published("TokenCut", "ViT-S/8 (DINO), no bilateral solver, CorLoc only",
              f"{TOKENCUT_README}: 'Different models' table of section 4.1", "unknown",
              dict.fromkeys(SOD, NA), {"VOC07": 67.3, "VOC12": 71.6, "COCO20k": 60.7}),
    Published("TokenCut + BS", "ViT-S/16 (DINO), with the bilateral solver",
              f"{TOKENCUT_README}: saliency table of section 4.2", "maxF_dataset",
              {"DUTS-TE": (91.4, 62.4, 75.5), "ECSSD": (93.4, 77.2, 87.4), "DUT-OMRON": (89.7, 61.8, 69.7)},
              dict.fromkeys(CORLOC, NA)),
    Published("SelfMask", "not stated by the source read (bilateral solver or not)",
              "Papers with Code entry of Shin et al., CVPRW 2022 (arXiv:2203.12614); the paper's own table "
              "was not read here", "maxF_image",
              {"DUTS-TE": (93.3, 66.0, 88.2), "ECSSD": (95.5, 81.8, 95.6), "DUT-OMRON": (91.9, 65.5, 85.2)},
              dict.fromkeys(CORLOC, NA)),
    Published("FOUND", "single and multi mode, with and without the bilateral solver",
              "Simeoni et al., CVPR 2023 (arXiv:2212.07834): not read here (the README of "
              "github.com/valeoai/FOUND gives no figures)", "maxF_image",
              dict.fromkeys(SOD, NA), dict.fromkeys(CORLOC, NA)),
    Published("SEMPART", "ViT-S/8 (DINO), single forward pass",
              "Ravindran and Basu, ICCV 2023 (arXiv:2309.10972): only the abstract was read (+3.7 maxF and "
              "+2.7 IoU over the previous best, on average); its tables were not", "unknown",
              dict.fromkeys(SOD, NA), dict.fromkeys(CORLOC, NA)),
)

CUTLER_README = ("github.com/facebookresearch/CutLER README (commit cca0a27), Model Zoo table, COCO column "
                 "of AP50 and AR (zero-shot unsupervised detection, boxes; its AR put under AR100)")


@dataclass(frozen=True)
class PublishedInstances:
    """A published COCO val2017 class-agnostic row, figures in % by `STATS` name for
    boxes and masks; a figure absent was not read from the source."""

    name: str
    variant: str
    source: str
    box: dict[str, float]
    mask: dict[str, float]


PUBLISHED_INSTANCES = (
    PublishedInstances("CutLER", "Cascade Mask R-CNN trained on MaskCut's ImageNet pseudo-masks (README's CutLER*, "
                       "cutler_cascade_final.pth)", CUTLER_README, {"AP50": 21.9, "AR100": 32.7}, {}),
    PublishedInstances("CutLER", "Mask R-CNN trained on MaskCut's ImageNet pseudo-masks (README's CutLER^, "
                       "cutler_mrcnn_final.pth)", CUTLER_README, {"AP50": 21.1, "AR100": 29.6}, {}),
    PublishedInstances("MaskCut", "pseudo-masks alone, no detector (ViT-B/8, N 3, tau 0.15: the README's maskcut.py command)",
                       "Wang et al., CVPR 2023 (arXiv:2301.11320): its tables were not read here", {}, {}),
)
OUR_INSTANCES = ("SEMPART + MaskCut (ours)", "MaskCut on the model's backbone keys, up to 3 per image, "
                 "bilateral refinement")


# Our rows: label -> (method, foreground rule, map).
OUR_ROWS = {
    "SEMPART fine (ours)": ("sempart", "border_rule_on", "fine"),
    "SEMPART coarse (ours)": ("sempart", "border_rule_on", "coarse"),
    "SEMPART fine, no border rule": ("sempart", "border_rule_off", "fine"),
    "TokenCut (ours, same backbone)": ("tokencut", "tokencut_seed_rule", "fine"),
    "TokenCut + BS (ours, same backbone)": ("tokencut-bs", "tokencut_seed_rule", "fine"),
}
OUR_VARIANTS = {
    "SEMPART fine (ours)": "fine map, border rule",
    "SEMPART coarse (ours)": "coarse (patch) map, border rule",
    "SEMPART fine, no border rule": "fine map, the rule's flip undone",
    "TokenCut (ours, same backbone)": "seed rule, nearest upsampling, no bilateral solver",
    "TokenCut + BS (ours, same backbone)": "seed rule, with the bilateral solver",
}


@dataclass(frozen=True)
class Split:
    """One dataset on disk: images, and masks (SOD) or boxes (CorLoc)."""

    name: str
    images: Path
    masks: Path | None = None
    boxes: BoxSet | None = None
    stems: set[str] | None = None


def _need(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise SystemExit(f"{what}: {path} is missing (see the layout in benchmarks/quality.py --help)")
    return path


def sod_split(name: str, root: Path) -> Split:
    images, masks = {"DUTS-TE": ("DUTS-TE-Image", "DUTS-TE-Mask"), "ECSSD": ("images", "ground_truth_mask"),
                     "DUT-OMRON": ("DUT-OMRON-image", "pixelwiseGT-new-PNG")}[name]
    return Split(name, _need(root / images, name), masks=_need(root / masks, name))


def voc_split(name: str, root: Path) -> Split:
    year = {"VOC07": "VOC2007", "VOC12": "VOC2012"}[name]
    base = next((p for p in (root / "VOCdevkit" / year, root / year, root) if (p / "Annotations").is_dir()), None)
    if base is None:
        raise SystemExit(f"{name}: no VOCdevkit/{year}/Annotations under {root}")
    trainval = base / "ImageSets" / "Main" / "trainval.txt"
    stems = set(trainval.read_text().split()) if trainval.is_file() else None
    return Split(name, _need(base / "JPEGImages", name), boxes=read_voc_boxes(base / "Annotations"), stems=stems)


def coco_split(name: str, root: Path, listing: Path | None) -> Split:
    if listing is None:
        raise SystemExit(f"{name}: give --coco20k-list coco_20k_filenames.txt (LOST's or TokenCut's list of the "
                         "19,817 train2014 images); without it the run would not be COCO20k")
    images = next((p for p in (root / "images" / "train2014", root / "train2014", root / "images") if p.is_dir()), None)
    jsons = sorted(root.glob("*.json")) + sorted((root / "annotations").glob("*.json"))
    if images is None or len(jsons) != 1:
        raise SystemExit(f"{name}: {root} needs an images folder and exactly one COCO .json "
                         f"(found {len(jsons)} .json files)")
    return Split(name, images, boxes=read_coco_boxes(jsons[0], read_image_list(listing)))


def evaluate(art, splits: list[Split], methods: Sequence[str], device: str,
             batch_size: int, limit: int | None, gt_binarize: str = "half") -> dict:
    """{dataset: {method: report}} for every split and method of a read artifact."""
    results: dict[str, dict[str, dict]] = {s.name: {} for s in splits}
    for method in methods:
        predictor = predictor_from_artifact(art, device, method, batch_size)
        for split in splits:
            log.info("%s on %s", method, split.name)
            results[split.name][method] = evaluate_model(
                predictor, split.images, split.masks, boxes=split.boxes, limit=limit, stems=split.stems,
                gt_binarize=gt_binarize)
    return results


def model_meta(art, gt_binarize: str) -> dict:
    cfg = art.config
    return {"model_id": art.model_id, "backbone": cfg.backbone.name, "image_size": cfg.data.image_size,
            "random_backbone": bool(art.meta.get("random_backbone", False)), "gt_binarize": gt_binarize}


def evaluate_coco_val(art, root: Path, device: str, batch_size: int, limit: int | None) -> dict:
    """The model's instances on COCO val2017 (`sempart eval --instances`'s report)."""
    gt = root / "annotations" / "instances_val2017.json"
    images = _need(root / "val2017", "COCO val2017")
    if not gt.is_file():
        raise SystemExit(f"COCO val2017: {gt} is missing (see the layout in benchmarks/quality.py --help)")
    predictor = predictor_from_artifact(art, device, "sempart", batch_size, InstanceConfig())
    log.info("instances on COCO val2017")
    return evaluate_model_instances(predictor, images, gt, limit)


def _weights(meta: dict) -> str:
    return "RANDOM backbone (plumbing check, figures meaningless)" if meta["random_backbone"] else "trained"


def format_instance_table(report: dict, meta: dict) -> str:
    """Markdown table of COCO val2017 class-agnostic figures: ours, then the published
    rows with their variant and source; a figure not read from a source is 'not read'."""
    header = (["method", "variant"] + [f"{kind} {k}" for kind in ("box", "mask") for k in STATS] + ["source"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ours = [f"{100 * report[kind][k]:.1f}" for kind in ("box", "mask") for k in STATS]
    lines.append("| " + " | ".join([*OUR_INSTANCES, *ours, "this run"]) + " |")
    for pub in PUBLISHED_INSTANCES:
        cells = [f"{figures[k]:.1f}" if k in figures else "not read" for figures in (pub.box, pub.mask) for k in STATS]
        lines.append("| " + " | ".join([f"{pub.name} (published)", pub.variant, *cells, pub.source]) + " |")
    lines += [
        "",
        f"Ours: model {meta['model_id'][:12]} ({_weights(meta)}), backbone {meta['backbone']} at "
        f"{meta['image_size']} px; {report['images']} of the {report['gt_images']} val2017 images, "
        f"{report['detections']} detections. Figures in %, class-agnostic COCOeval (every category "
        "one, crowd regions ignored).",
    ]
    return "\n".join(lines)


def our_figures(results: dict) -> dict:
    """{row label: {dataset: figures in %}} for the rows the run has."""
    rows: dict[str, dict[str, dict]] = {}
    for label, (method, rule, kind) in OUR_ROWS.items():
        for dataset, by_method in results.items():
            report = by_method.get(method)
            if report is None:
                continue
            if dataset in SOD and rule in report:
                m = report[rule][kind]
                figures = {k: round(100 * m[k], 1) for k in ("Acc", "IoU", "maxF_dataset", "maxF_image")}
                figures["n_images"] = m["n_images"]
            elif dataset in CORLOC and kind == "fine" and rule in report.get("corloc", {}):
                c = report["corloc"]
                figures = {"CorLoc": round(100 * c[rule], 1), "n_images": c["n_images"],
                           "n_without_box": c["n_without_box_counted_as_miss"]}
            else:
                continue
            rows.setdefault(label, {})[dataset] = figures
    return rows


def _cell(values: Sequence[float | None] | None) -> str:
    if values is None:
        return "n/a"
    return " / ".join("-" if v is None else f"{v:.1f}" for v in values)


def format_table(rows: dict, datasets: list[str], meta: dict) -> str:
    """Markdown table: our rows, then the published ones, each with its variant and source."""
    sod = [d for d in SOD if d in datasets]
    corloc = [d for d in CORLOC if d in datasets]
    header = (["method", "variant"] + [f"{d} Acc / IoU / maxF_dataset / maxF_image" for d in sod]
              + [f"{d} CorLoc" for d in corloc] + ["source"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, figures in rows.items():
        cells = [_cell([figures[d][k] for k in ("Acc", "IoU", "maxF_dataset", "maxF_image")])
                 if d in figures else "n/a" for d in sod]
        cells += [_cell([figures[d]["CorLoc"]]) if d in figures else "n/a" for d in corloc]
        lines.append("| " + " | ".join([label, OUR_VARIANTS[label], *cells, "this run"]) + " |")
    for pub in PUBLISHED:
        cells = []
        for d in sod:
            f = pub.sod[d]
            cells.append("n/a" if f is None else _cell(
                [f[0], f[1], f[2] if pub.maxf == "maxF_dataset" else None, f[2] if pub.maxf == "maxF_image" else None]))
        cells += ["n/a" if pub.corloc[d] is None else _cell([pub.corloc[d]]) for d in corloc]
        lines.append("| " + " | ".join([f"{pub.name} (published)", pub.variant, *cells, pub.source]) + " |")
    lines += [
        "",
        f"Ours: model {meta['model_id'][:12]} ({_weights(meta)}), backbone {meta['backbone']} at "
        f"{meta['image_size']} px; TokenCut rows use the same backbone and size. Figures in %; '-' = the "
        "source does not report that convention; n/a = no figure from a source read here.",
        f"Ground truth: {GT_BINARIZE[meta['gt_binarize']]} (--gt-binarize {meta['gt_binarize']}).",
        "Published TokenCut rows run at the image's own resolution.",
    ]
    coco = next((f["COCO20k"] for f in rows.values() if "COCO20k" in f), None)
    if coco is not None:
        lines.append(f"COCO20k: {coco['n_images']} images, {coco['n_without_box']} without a non-crowd box "
                     "counted as misses (as TokenCut's loop).")
    return "\n".join(lines)


def quick_inputs(workdir: Path) -> tuple[str, Path]:
    """A random tiny model and the shipped DUTS-TE photos laid out as the official release."""
    cfg = SempartConfig()
    cfg.backbone.name, cfg.backbone.weights = QUICK_MODEL["backbone"], "random"
    cfg.data.image_size = QUICK_MODEL["image_size"]
    model = workdir / "model"
    save_untrained_artifact(str(model), cfg)
    root = workdir / "DUTS-TE"
    (root / "DUTS-TE-Image").mkdir(parents=True)
    (root / "DUTS-TE-Mask").mkdir()
    for image in sorted((SHIPPED_DUTS_TE / "images").iterdir()):
        (root / "DUTS-TE-Image" / image.name).symlink_to(image)
        mask = SHIPPED_DUTS_TE / "masks" / f"{image.stem}.png"
        (root / "DUTS-TE-Mask" / mask.name).symlink_to(mask)
    return str(model), root


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--model", help="model folder or URI (a trained SEMPART artifact)")
    for flag in ("duts-te", "ecssd", "dut-omron", "voc07", "voc12", "coco20k", "coco-val"):
        parser.add_argument(f"--{flag}", type=Path, metavar="DIR")
    parser.add_argument("--coco20k-list", type=Path, metavar="FILE",
                        help="coco_20k_filenames.txt (LOST/TokenCut): the COCO20k images; required with --coco20k")
    parser.add_argument("--gt-binarize", choices=sorted(GT_BINARIZE), default="half",
                        help="half: GT > 127 (default) | nonzero: any non-zero GT pixel (TokenCut's code)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="at most N images per dataset")
    parser.add_argument("--quick", action="store_true",
                        help="random tiny backbone, the shipped DUTS-TE photos (for tests)")
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    if not args.quick and args.model is None:
        parser.error("--model is required (or --quick)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sempart-quality-") as tmp:
        if args.quick and (args.model is None or args.duts_te is None):
            model, duts = quick_inputs(Path(tmp))
            args.model = args.model or model
            args.duts_te = args.duts_te or duts
        given = {"DUTS-TE": args.duts_te, "ECSSD": args.ecssd, "DUT-OMRON": args.dut_omron,
                 "VOC07": args.voc07, "VOC12": args.voc12, "COCO20k": args.coco20k}
        splits = []
        for name, root in given.items():
            if root is None:
                continue
            if name in SOD:
                splits.append(sod_split(name, Path(root)))
            elif name.startswith("VOC"):
                splits.append(voc_split(name, Path(root)))
            else:
                splits.append(coco_split(name, Path(root), args.coco20k_list))
        if not splits and args.coco_val is None:
            raise SystemExit("give at least one dataset folder (--duts-te DIR, ...)")
        art = read_artifact(args.model)
        meta = model_meta(art, args.gt_binarize)
        results = (evaluate(art, splits, args.methods, args.device, args.batch_size, args.limit, args.gt_binarize)
                   if splits else {})
        coco = (evaluate_coco_val(art, Path(args.coco_val), args.device, args.batch_size, args.limit)
                if args.coco_val is not None else None)
    rows = our_figures(results)
    figures = {**meta, "methods": args.methods}
    if splits:
        print(format_table(rows, [s.name for s in splits], meta))
        figures.update(ours=rows, published=[{"name": p.name, "variant": p.variant, "source": p.source,
                                              "maxF": p.maxf, **p.sod, **p.corloc} for p in PUBLISHED])
    if coco is not None:
        print(format_instance_table(coco, meta))
        figures["coco_val"] = {"ours": {k: coco[k] for k in ("box", "mask", "images", "detections")},
                               "published": [vars(p) for p in PUBLISHED_INSTANCES]}
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

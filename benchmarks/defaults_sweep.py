"""The training defaults, measured: a small sweep on the synthetic proxy, against TokenCut.

The proxy is the run the README shows on synthetic scenes: a tiny RANDOM ViT-Ti/16 at
128 px (`graph.tau` 0.8, what random features need), 300 steps of batch 8 on 256
scenes (`--n-train`; on 48 the heads learn the training scenes' stripes and lose to
TokenCut on unseen ones whatever the weights, docs/method.md "Defaults"). For each configuration (image-TV weight, border prior, learning rate) and seed,
it trains the heads with `sempart_core.training.fit` (the step `sempart train` runs on
every Ray Train worker) and scores, on 48 scenes never trained on:

- the fine mask's IoU, per image then averaged, and TokenCut's on the same backbone,
  graph and scenes (`iou`, `tokencut_iou`);
- how well `score` ranks the masks: Spearman's rho between score and IoU over the
  scenes, and the mean IoU of the 20 % with the highest and the lowest score.

Everything else is the config's default, so the configuration equal to the defaults is
marked "shipped". Seed s sets the heads' initialisation, the batch order and the scene
sets (training scenes seeded 2s + 1, test scenes 2s + 2). One torch thread per run, so
the figures do not depend on the machine's thread count; `--jobs` runs that many at once.

    python benchmarks/defaults_sweep.py --quick            # one tiny run, for the tests
    python benchmarks/defaults_sweep.py --jobs 2 --out sweep.jsonl
    python benchmarks/defaults_sweep.py --configs shipped --seeds 0,1,2,3,4

`--out FILE` appends one JSON line per finished run and skips the runs already in it, so
a long sweep can be stopped and continued. Prints a Markdown table, then as its last
line one JSON object of the figures.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sempart_core.config import LossConfig, SempartConfig, TrainConfig, load_config

log = logging.getLogger("benchmarks.defaults_sweep")

# The README's synthetic-scenes run; loss weights and lr come from each configuration.
PROXY = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "synthetic_tiny_cpu.yaml"
N_TRAIN, N_TEST = 256, 48
QUICK = {"steps": 2, "n_train": 4, "n_test": 5, "image_size": 64}


@dataclass(frozen=True)
class Candidate:
    """The values swept: image-TV weight, border-prior weight, learning rate."""

    itv: float
    border: float
    lr: float

    @property
    def shipped(self) -> bool:
        return (self.itv, self.border, self.lr) == (LossConfig.itv, LossConfig.border, TrainConfig.lr)


CANDIDATES = {
    # The defaults before issue 21: image-TV weight 1 at 128 px before the term was divided
    # by the side instead of the area, which is 1/128 now.
    "before": Candidate(itv=1 / 128, border=0.0, lr=1e-4),
    "itv 0.25": Candidate(itv=0.25, border=0.1, lr=2e-3),
    "shipped": Candidate(itv=1.0, border=0.1, lr=2e-3),
    "itv 4": Candidate(itv=4.0, border=0.1, lr=2e-3),
    "border 0": Candidate(itv=1.0, border=0.0, lr=2e-3),
    "border 0.3": Candidate(itv=1.0, border=0.3, lr=2e-3),
    "lr 1e-3": Candidate(itv=1.0, border=0.1, lr=1e-3),
}


@dataclass(frozen=True)
class Run:
    name: str
    candidate: Candidate
    seed: int
    steps: int | None = None  # None: the proxy's
    n_train: int = N_TRAIN
    n_test: int = N_TEST
    image_size: int | None = None  # None: the proxy's

    def config(self) -> SempartConfig:
        cfg = load_config(PROXY)
        cfg.loss.itv, cfg.loss.border = self.candidate.itv, self.candidate.border
        cfg.train.lr, cfg.train.seed = self.candidate.lr, self.seed
        cfg.train.steps = self.steps or cfg.train.steps
        cfg.data.image_size = self.image_size or cfg.data.image_size
        return cfg


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    union = np.count_nonzero(pred | gt)
    return np.count_nonzero(pred & gt) / union if union else 1.0


def score_ranking(scores: Sequence[float], ious: Sequence[float], share: float = 0.2) -> dict:
    """Spearman's rho of score against IoU, and the mean IoU of the top and bottom `share`
    of the images by score (ties kept in image order)."""
    scores, ious = np.asarray(scores, dtype=np.float64), np.asarray(ious, dtype=np.float64)
    k = max(1, round(share * len(scores)))
    order = np.argsort(-scores, kind="stable")
    rho = spearmanr(scores, ious).statistic if np.ptp(scores) > 0 and np.ptp(ious) > 0 else float("nan")
    return {"spearman": float(rho), "top20_iou": float(ious[order[:k]].mean()),
            "bottom20_iou": float(ious[order[-k:]].mean())}


def run_one(run: Run) -> dict:
    """Train one configuration and seed, then score SEMPART and TokenCut on unseen scenes."""
    import torch

    from sempart_core.model import build_model
    from sempart_core.predictor import Predictor
    from sempart_core.synthetic import synthetic_dataset
    from sempart_core.training import fit, random_batches

    torch.set_num_threads(1)
    if not logging.getLogger().handlers:  # a spawned worker: log its training progress too
        logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {run.name} seed {run.seed}: %(message)s")
    start = time.perf_counter()
    cfg = run.config()
    size = (cfg.data.image_size, cfg.data.image_size)
    train_images, _ = synthetic_dataset(run.n_train, size=size, seed=2 * run.seed + 1)
    test_images, test_masks = synthetic_dataset(run.n_test, size=size, seed=2 * run.seed + 2)
    backbone, heads = build_model(cfg, seed=run.seed)
    history = fit(backbone, heads, random_batches(train_images, cfg, backbone.patch_size, seed=run.seed), cfg)
    ours = Predictor(backbone, heads, cfg).predict(test_images)
    tokencut = Predictor(backbone, None, cfg, method="tokencut").predict(test_images)
    ious = [mask_iou(p.mask, m) for p, m in zip(ours, test_masks)]
    block = np.ones((backbone.patch_size,) * 2, dtype=bool)  # the coarse map, one block per patch
    coarse = [mask_iou(np.kron(p.coarse > 0.5, block), m) for p, m in zip(ours, test_masks)]
    return {
        "config": run.name, **asdict(run.candidate), "seed": run.seed, "steps": cfg.train.steps,
        "n_train": run.n_train,
        "iou": float(np.mean(ious)), "coarse_iou": float(np.mean(coarse)),
        "tokencut_iou": float(np.mean([mask_iou(p.mask, m) for p, m in zip(tokencut, test_masks)])),
        **score_ranking([p.score for p in ours], ious),
        "final_ncut": history[-1]["ncut"], "seconds": round(time.perf_counter() - start, 1),
        # per test scene, to study other scores offline
        "scene_iou": [round(v, 4) for v in ious], "scene_score": [round(p.score, 4) for p in ours],
        "scene_ncut": [round(p.ncut, 4) for p in ours],
    }


def _fmt(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def summarise(results: list[dict]) -> list[dict]:
    """One row per configuration (in CANDIDATES order): per-seed and mean figures."""
    rows = []
    for name, cand in CANDIDATES.items():
        runs = sorted((r for r in results if r["config"] == name), key=lambda r: r["seed"])
        if not runs:
            continue
        margin = [r["iou"] - r["tokencut_iou"] for r in runs]
        rows.append({
            "config": name, **asdict(cand), "shipped": cand.shipped, "seeds": [r["seed"] for r in runs],
            "iou": [r["iou"] for r in runs], "tokencut_iou": [r["tokencut_iou"] for r in runs],
            "mean_iou": float(np.mean([r["iou"] for r in runs])), "min_margin": float(min(margin)),
            "spearman": [r["spearman"] for r in runs], "top20_iou": [r["top20_iou"] for r in runs],
            "bottom20_iou": [r["bottom20_iou"] for r in runs],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| config | itv | border | lr | SEMPART IoU per seed | mean | TokenCut IoU per seed | "
        "min margin | score rho per seed | top / bottom 20 % IoU (mean) |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        name = f"**{r['config']}**" if r["shipped"] else r["config"]
        lines.append(
            f"| {name} | {r['itv']:g} | {r['border']:g} | {r['lr']:g} | {_fmt(r['iou'])} | {r['mean_iou']:.3f} | "
            f"{_fmt(r['tokencut_iou'])} | {r['min_margin']:+.3f} | {_fmt(r['spearman'])} | "
            f"{np.mean(r['top20_iou']):.3f} / {np.mean(r['bottom20_iou']):.3f} |"
        )
    return "\n".join(lines)


def _done(out: Path | None) -> list[dict]:
    if out is None or not out.exists():
        return []
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--configs", default=",".join(CANDIDATES),
                        help="comma-separated names, 'shipped' for the defaults (default: all)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each")
    parser.add_argument("--n-train", type=int, default=N_TRAIN, help=f"training scenes (default {N_TRAIN})")
    parser.add_argument("--out", type=Path, help="JSON lines of finished runs: appended, and skipped when rerun")
    parser.add_argument("--quick", action="store_true", help="one seed of the shipped defaults, a few steps, tiny scenes")
    args = parser.parse_args(argv)
    shipped = [n for n, c in CANDIDATES.items() if c.shipped]
    names = [n for n in args.configs.split(",") if n]
    names = [n for part in names for n in (shipped if part == "shipped" else [part])]
    if args.quick:
        names, args.seeds = shipped, "0"
    unknown = set(names) - set(CANDIDATES)
    if not names or unknown:
        parser.error(f"--configs: choose from {', '.join(CANDIDATES)} or 'shipped'")
    args.names = names
    args.seed_list = [int(s) for s in args.seeds.split(",") if s]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    size = QUICK if args.quick else {"n_train": args.n_train}
    done = _done(args.out)
    have = {(r["config"], r["seed"]) for r in done}
    # Seed by seed, so that a sweep stopped early has every configuration on the first seeds.
    todo = [Run(n, CANDIDATES[n], s, **size) for s in args.seed_list for n in args.names if (n, s) not in have]
    log.info("%d runs to do, %d already in %s", len(todo), len(have), args.out)
    results = [r for r in done if r["config"] in args.names and r["seed"] in args.seed_list]
    if args.jobs > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            finished = pool.imap_unordered(run_one, todo)
            results += [_record(r, args.out) for r in finished]
    else:
        results += [_record(run_one(run), args.out) for run in todo]
    rows = summarise(results)
    print(format_table(rows))
    n_train = QUICK["n_train"] if args.quick else args.n_train
    print(json.dumps({"proxy": str(PROXY.relative_to(PROXY.parents[2])), "n_train": n_train, "n_test": N_TEST, "quick": args.quick, "rows": rows}))
    return 0


def _record(result: dict, out: Path | None) -> dict:
    log.info("%s seed %d: IoU %.3f, TokenCut %.3f, score rho %.3f (%.0f s)", result["config"], result["seed"],
             result["iou"], result["tokencut_iou"], result["spearman"], result["seconds"])
    if out is not None:
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(main())

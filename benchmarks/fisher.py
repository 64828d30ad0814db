"""Per-sample empirical Fisher throughput: the vectorised path against a plain loop.

Both paths run in the same process on the same inputs: the demo encoder (32 px) and
ViT-B-32 (224 px, random weights, random images), each with a random linear head. Reports
samples/s, the speed-up, peak resident memory growth, and the largest relative difference
between the two results (they must agree to float32 round-off). Prints a table, writes CSV.

    python benchmarks/fisher.py
    python benchmarks/fisher.py --models demo --samples 512 --threads 1
"""

from __future__ import annotations

import argparse
import csv
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.fisher import empirical_fisher, empirical_fisher_loop  # noqa: E402
from pipeline.models.backbone import ImageClassifier  # noqa: E402


def build(model: str) -> tuple[torch.nn.Module, int]:
    """(encoder, image size) with deterministic random weights."""
    torch.manual_seed(0)
    if model == "demo":
        from pipeline.models.backbone import DEMO_VISION_CFG, build_visual

        return build_visual(), int(DEMO_VISION_CFG["image_size"])
    import open_clip

    return open_clip.create_model(model, pretrained=None).visual, 224


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-32"])
    ap.add_argument("--samples", type=int, nargs="+", default=[1024, 64], help="samples per model, in the order of --models")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "fisher.csv"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model, n in zip(args.models, args.samples + [args.samples[-1]] * len(args.models)):
        encoder, size = build(model)
        g = torch.Generator().manual_seed(1)
        images = torch.rand(n, 3, size, size, generator=g)
        labels = torch.randint(0, 10, (n,), generator=g)
        with torch.no_grad():
            dim = encoder(images[:2]).shape[-1]
        head_w = torch.nn.functional.normalize(torch.randn(10, dim, generator=g), dim=-1) * 20
        classifier = ImageClassifier(encoder, head_w, torch.zeros(10))
        names = [f"encoder.{p}" for p, _ in encoder.named_parameters()]
        result = {}
        for path, fn in (("vectorised", empirical_fisher), ("loop", empirical_fisher_loop)):
            before = peak_rss_mb()
            start = time.perf_counter()
            result[path] = fn(
                classifier, images, labels, [1.0], param_names=names, batch_size=64,
                chunk_size=args.chunk_size, seed=0, progress=False,
            )[1.0]
            wall = time.perf_counter() - start
            rows.append({"model": model, "path": path, "samples": n, "seconds": wall, "samples_per_s": n / wall, "peak_rss_growth_mb": peak_rss_mb() - before})
        diff = max(
            float((result["vectorised"][k] - result["loop"][k]).abs().max() / result["loop"][k].abs().max().clamp_min(1e-30))
            for k in result["loop"]
        )
        vec, loop = rows[-2], rows[-1]
        vec["speedup"] = loop["seconds"] / vec["seconds"]
        vec["max_rel_diff"] = diff
    keys = ["model", "path", "samples", "seconds", "samples_per_s", "speedup", "max_rel_diff", "peak_rss_growth_mb"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"threads: {torch.get_num_threads()}, chunk size {args.chunk_size} (CSV: {args.out})")
    print("  ".join(f"{k:>18}" for k in keys))
    for r in rows:
        print("  ".join(f"{(f'{r[k]:.4g}' if isinstance(r.get(k), float) else str(r.get(k, ''))):>18}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

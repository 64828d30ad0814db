"""Per-sample empirical Fisher throughput: the vectorised path against a plain loop.

For each backbone (default: the demo encoder at 32 px and ViT-B-32 at 224 px, random
weights, random images, a random 10-class head) three paths run in the same process on the
same samples, on the same device and in the same precision:

* ``vectorised``: ``pipeline.fisher.empirical_fisher`` (traced per-sample gradients).
* ``loop``: the baseline, a plain PyTorch loop on the module itself: for each sample one
  forward, one ``loss.backward()``, then ``Σ p.grad²``. No functional_call or other overhead
  on top of ordinary training code (``empirical_fisher_loop``, the library's reference, has a
  little more per sample), so the speed-up is not flattered.
* ``batched-grad``: ordinary mini-batch training's gradient (one forward and backward per
  chunk, mean loss, no per-sample anything). Not a Fisher: a floor for what any per-sample
  method can cost, which puts the speed-up in context.

Each path is warmed up on one chunk first (lazy initialisation, kernel selection), then timed
``--repeats`` times (default 3); the fastest run counts, for every path alike (on a shared
machine the others measure the neighbours). Reported:
samples/s by wall clock and, on the CPU, by process CPU time (robust on a busy machine when
threads = 1); peak memory growth (CPU: resident set, sampled every 2 ms; CUDA:
``torch.cuda.max_memory_allocated``); for ``vectorised`` the speed-up over ``loop`` and
``max_rel_diff``, the largest ``max|F_vec − F_loop| / max|F_loop|`` over the tensors.

    python benchmarks/fisher.py                                  # demo + ViT-B-32, auto device
    python benchmarks/fisher.py --models demo --samples 1024 --threads 1
    python benchmarks/fisher.py --device cuda --dtype bfloat16 --samples 4096 512 --chunk-size 64
    python benchmarks/fisher.py --device cuda --models ViT-B-16 --samples 256 --chunk-size 8 16 32 64
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.devices import resolve_device  # noqa: E402
from pipeline.fisher import empirical_fisher  # noqa: E402
from pipeline.models.backbone import ImageClassifier  # noqa: E402
from pipeline.models.clip import build_encoder, image_size  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
N_CLASSES = 10
COLUMNS = [
    "model", "path", "device", "dtype", "threads", "samples", "chunk", "seconds",
    "samples_per_s", "cpu_samples_per_s", "speedup", "max_rel_diff", "peak_mem_mb",
]  # fmt: skip


class PeakMemory:
    """Peak memory growth over a ``with`` block, in MiB: CUDA allocator or sampled CPU RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, _rss_bytes())
        self.peak_mb = (peak - self._base) / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def task(name: str, n: int) -> tuple[ImageClassifier, torch.Tensor, torch.Tensor, list[str]]:
    """(encoder + random head, images [n, 3, S, S], labels [n], encoder parameter names)."""
    torch.manual_seed(0)
    encoder = build_encoder(name)
    size = image_size(name)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, size, size, generator=g)
    labels = torch.randint(0, N_CLASSES, (n,), generator=g)
    with torch.no_grad():
        dim = encoder.eval()(images[:1]).shape[-1]
    head = F.normalize(torch.randn(N_CLASSES, dim, generator=g), dim=-1) * 20  # CLIP-like scale
    names = [f"encoder.{p}" for p, _ in encoder.named_parameters()]
    return ImageClassifier(encoder, head, torch.zeros(N_CLASSES)), images, labels, names


def _precision(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def plain_loop(model, images, labels, device, dtype) -> dict[str, torch.Tensor]:
    """Baseline: one forward + loss.backward() per sample; (1/n) Σ_n grad² per parameter."""
    model = model.to(device).eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with _precision(device, dtype):
        for i in range(len(labels)):
            model.zero_grad(set_to_none=True)
            x, y = images[i : i + 1].to(device), labels[i : i + 1].to(device)
            F.cross_entropy(model(x).float(), y).backward()
            for n, p in params.items():
                sums[n].addcmul_(p.grad, p.grad)
    return {n: (s / len(labels)).cpu() for n, s in sums.items()}


def batched_grad(model, images, labels, device, dtype, chunk: int) -> None:
    """Floor: the mean-loss gradient of each chunk (ordinary mini-batch training's work)."""
    model = model.to(device).eval()
    with _precision(device, dtype):
        for s in range(0, len(labels), chunk):
            model.zero_grad(set_to_none=True)
            x, y = images[s : s + chunk].to(device), labels[s : s + chunk].to(device)
            F.cross_entropy(model(x).float(), y).backward()
    model.zero_grad(set_to_none=True)


def timed(device: torch.device, fn: Callable[[], object]) -> tuple[object, float, float, float]:
    """(result, wall seconds, process CPU seconds, peak memory growth MiB) of fn()."""
    with PeakMemory(device) as memory:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu, memory.peak_mb


def max_rel_diff(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    return max(
        float((got[k] - e).abs().max() / e.abs().max().clamp_min(1e-30))
        for k, e in expected.items()
    )


def bench_model(name: str, n: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    chunks = list(dict.fromkeys(min(c, n) for c in args.chunk_size))
    chunk = chunks[0]
    model, images, labels, names = task(name, n)
    if device.type == "cuda":  # pinned once: the copies then overlap nothing but cost no paging
        images, labels = images.pin_memory(), labels.pin_memory()

    def vectorised(c: int):
        def run(m: int = n) -> dict[str, torch.Tensor]:
            return empirical_fisher(
                model, images[:m], labels[:m], [1.0], param_names=names, batch_size=m,
                chunk_size=c, seed=0, device=device, dtype=dtype, progress=False,
            )[1.0]  # fmt: skip

        return run

    # path: (function, its chunk); further --chunk-size values add vectorised rows of their own
    runs = {
        "vectorised": (vectorised(chunk), chunk),
        "loop": (lambda m=n: plain_loop(model, images[:m], labels[:m], device, dtype), chunk),
        "batched-grad": (
            lambda m=n: batched_grad(model, images[:m], labels[:m], device, dtype, chunk),
            chunk,
        ),
        **{f"vectorised@{c}": (vectorised(c), c) for c in chunks[1:]},
    }
    rows, results = [], {}
    for path, (fn, c) in runs.items():
        fn(min(n, c))  # warm-up on one chunk
        runs_ = [timed(device, fn) for _ in range(args.repeats)]
        results[path] = runs_[0][0]
        wall, cpu = min(r[1] for r in runs_), min(r[2] for r in runs_)
        peak = max(r[3] for r in runs_)
        rows.append({
            "model": name, "path": path, "device": str(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "samples": n, "chunk": c, "seconds": wall,
            "samples_per_s": n / wall,
            "cpu_samples_per_s": n / cpu if device.type == "cpu" and cpu > 0 else "",
            "peak_mem_mb": peak,
        })  # fmt: skip
    loop = rows[1]
    for row in rows:
        if row["path"].startswith("vectorised"):
            row["speedup"] = loop["seconds"] / row["seconds"]
            row["max_rel_diff"] = max_rel_diff(results[row["path"]], results["loop"])
    # Computed on the CPU, the RSS counters also see the model copies; free them between models
    # (the closures above hold the model and the data until `runs` goes).
    runs.clear()
    results.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", nargs="+", default=["demo", "ViT-B-32"], help="backbone names")
    ap.add_argument(
        "--samples", type=int, nargs="+", default=[1024, 32],
        help="samples per model, in the order of --models (the last repeats)",
    )  # fmt: skip
    ap.add_argument(
        "--chunk-size", type=int, nargs="+", default=[128],
        help="samples per vectorised chunk (default: the demo config's); more values add a "
             "`vectorised@C` row for each (the loop and batched-grad use the first)",
    )  # fmt: skip
    ap.add_argument(
        "--repeats", type=int, default=3, help="timed runs per path; the fastest counts"
    )
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument(
        "--out", default=None, help="CSV path (default benchmarks/out/fisher_{device}_{dtype}.csv)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.dtype == "float32":  # all three paths in true float32 (no TF32 convolutions on CUDA)
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    samples = args.samples + [args.samples[-1]] * max(0, len(args.models) - len(args.samples))
    rows = []
    for name, n in zip(args.models, samples):
        rows += bench_model(name, n, args, device)
    out = Path(args.out or REPO / "benchmarks" / "out" / f"fisher_{device.type}_{args.dtype}.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{label}, torch {torch.__version__}, {torch.get_num_threads()} threads (CSV: {out})")
    shown = [c for c in COLUMNS if c not in ("device", "dtype", "threads")]
    print("  ".join(f"{c:>17}" for c in shown))
    for r in rows:
        cells = (f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in shown)
        print("  ".join(f"{c:>17}" for c in cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

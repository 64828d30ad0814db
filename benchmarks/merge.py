"""Merge wall time and peak memory at real scale, through the pipeline's own command line.

Generates ViT-shaped inputs once into a cache folder (open_clip visual tower with
`pretrained=None` as θ0; T fine-tuned checkpoints θ0 + low-rank + noise; Fisher diagonals
with row/column structure and per-task scales), then times each method's full merge
(basis + projected Hessian + solve + lift + write) as `python -m pipeline merge` in a fresh
process, and an α sweep three ways: through the cached stages (`basis`, `hessian`, then one
merge process per α reading them, as the workflow runs it), the cached stages and one
`merge --alpha a1 a2 ...` process, and that one process alone (run --repeats times, each
right after one of the single EpiMer merges it is compared with: the machine's speed drifts
over a benchmark). Every timed run writes to outputs removed just before it, as a first run
would (replacing an earlier run's Zarr store deletes its few hundred files: about 0.1 s per
store, which a rerun would add to each α of a sweep). Prints a table and writes CSV.

    python benchmarks/merge.py                       # ViT-B-32, T = 8, k = 32, all methods
    python benchmarks/merge.py --methods isoc isocts gradmatch --spectrum power-0.5 --sweep 0
    python benchmarks/merge.py --backbone ViT-L-14 --methods tsvm epimer --repeats 1
    python benchmarks/merge.py --methods epimer --fisher-rank 1 2 4 8 --sweep 0
    python benchmarks/merge.py --spectrum noise-floor power-0.5 --methods tsvm epimer --sweep 0
    python benchmarks/merge.py --layer 3072 768      # one c_fc layer's SVDs per family, one thread

Each --spectrum family (default: all) is its own set of inputs and rows; TSV-M and EpiMer also
run with every truncated SVD on the exact path (PIPELINE_EXACT_SVD=1), and `vs_exact_svd` is
the distance of the merged update to that reference's.

The `epimer` row is the default solver, `auto` (conjugate gradients where they converge within
p/8 steps, H̄ formed elsewhere). EpiMer also runs with each `--solver` of --solvers (default
`dense`: H̄ formed, Cholesky; `cg`: H̄ never formed), with the worst layer's final relative
residual, the most CG steps any layer took and the layers whose H̄ was formed, and with
`--fisher-rank R` for each R of --fisher-rank (default 1 and 4: H̄ from a non-negative rank-R
factorisation of F̄, with the worst layer's relative Fisher error). Each EpiMer row gives the
distance of its merged update to the dense one's (`vs_exact`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

if TYPE_CHECKING:
    import torch

EXACT_ENV = "PIPELINE_EXACT_SVD"  # pipeline.subspace.EXACT_ENV, without importing torch here


#: The task vectors' spectral families (--spectrum). Each matrix layer's δ_t, with
#: ‖δ_t‖_F = 2·10⁻³·√(d_out·d_in) where the spectrum is prescribed:
SPECTRA = {
    "low-rank": "rank 64 plus a 1e-4 Gaussian floor: a gap at k = 32 (the default inputs)",
    "power-0.5": "σ_i ∝ i^-1/2 over all min(d_out, d_in) values, Haar-random singular vectors",
    "power-1": "σ_i ∝ i^-1, Haar-random singular vectors",
    "noise-floor": "rank 16 plus a dense Gaussian bulk that holds σ_k (σ₃₃/σ₃₂ ≈ 0.997 at 3072 × 768)",
    "rank-deficient": "exactly rank 16 < k, no noise",
    "duplicated": "the low-rank family with task t + T/2 a copy of task t",
    "fisher-scales": "the low-rank family with Fisher scales 10^-3 … 10^3 across the tasks (10⁶×)",
}


def _task_vector(shape: tuple[int, int], spectrum: str, g) -> torch.Tensor:
    """One matrix layer's δ_t of the family `spectrum` (see SPECTRA), float32."""
    import torch

    d_out, d_in = shape
    scale = 2e-3 * (d_out * d_in) ** 0.5
    if spectrum in ("power-0.5", "power-1"):
        n = min(shape)
        sigma = torch.arange(1, n + 1, dtype=torch.float32) ** (
            -0.5 if spectrum == "power-0.5" else -1.0
        )
        U = torch.linalg.qr(torch.randn(d_out, n, generator=g))[0]
        V = torch.linalg.qr(torch.randn(d_in, n, generator=g))[0]
        return (U * (scale * sigma / sigma.norm())) @ V.T
    if spectrum in ("noise-floor", "rank-deficient"):
        low = torch.randn(d_out, 16, generator=g) @ torch.randn(16, d_in, generator=g)
        delta = 2e-3 * low / 16**0.5
        if (
            spectrum == "noise-floor"
        ):  # the bulk's top edge ≈ 4e-4·(√d_out + √d_in), below the 16 directions
            delta += 4e-4 * torch.randn(shape, generator=g)
        return delta
    low = torch.randn(d_out, 64, generator=g) @ torch.randn(64, d_in, generator=g)
    return 2e-3 * low / 64**0.5 + 1e-4 * torch.randn(shape, generator=g)


def generate(
    cache: Path, backbone: str, tasks: int, spectrum: str = "low-rank", seed: int = 0
) -> dict:
    """θ0, T checkpoints and T Fisher files as safetensors under cache/{backbone}_T{tasks}[_{spectrum}]."""
    import torch

    from pipeline.store import write_safetensors

    root = cache / (
        f"{backbone}_T{tasks}" if spectrum == "low-rank" else f"{backbone}_T{tasks}_{spectrum}"
    )
    done = root / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    base = {
        k: v.detach().clone().contiguous() for k, v in visual_tower(backbone).state_dict().items()
    }
    write_safetensors(root / "pretrained.safetensors", base)
    g = torch.Generator().manual_seed(seed)
    paths = {"pretrained": str(root / "pretrained.safetensors"), "finetuned": [], "fisher": []}
    for t in range(tasks):
        ft, fis = {}, {}
        # Fisher magnitudes differ by orders across tasks: 10^-2 … 10^1, or 10^-3 … 10^3.
        task_scale = (
            10.0 ** (6 * t / max(1, tasks - 1) - 3)
            if spectrum == "fisher-scales"
            else 10.0 ** (t % 4 - 2)
        )
        if spectrum == "duplicated" and t >= (tasks + 1) // 2:
            source = t - (tasks + 1) // 2
            paths["finetuned"].append(paths["finetuned"][source])
            paths["fisher"].append(paths["fisher"][source])
            continue
        for name, v in base.items():
            if v.ndim == 2:
                ft[name] = v + _task_vector(tuple(v.shape), spectrum, g)
                rows = torch.rand(v.shape[0], 1, generator=g) ** 2
                cols = torch.rand(1, v.shape[1], generator=g) ** 2
                fis[name] = task_scale * rows * cols * torch.rand(v.shape, generator=g)
            else:
                ft[name] = v + 1e-3 * torch.randn(v.shape, generator=g)
                fis[name] = task_scale * torch.rand(v.shape, generator=g) ** 2
        write_safetensors(root / f"task{t}.safetensors", ft)
        write_safetensors(root / f"fisher{t}.safetensors", fis)
        paths["finetuned"].append(str(root / f"task{t}.safetensors"))
        paths["fisher"].append(str(root / f"fisher{t}.safetensors"))
        print(f"generated task {t + 1}/{tasks}", file=sys.stderr)
    done.write_text(json.dumps(paths))
    return paths


#: open_clip's visual-tower settings, for machines without open_clip (GPU nodes): the same
#: tensor names and shapes through the package's copy of its VisionTransformer.
VISION_CFGS = {
    "ViT-B-32": dict(
        image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512
    ),
    "ViT-B-16": dict(
        image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4.0, output_dim=512
    ),
    "ViT-L-14": dict(
        image_size=224,
        patch_size=14,
        width=1024,
        layers=24,
        heads=16,
        mlp_ratio=4.0,
        output_dim=768,
    ),
}


def visual_tower(backbone: str):
    """open_clip's `visual` tower with pretrained=None, or the package's copy when open_clip is absent."""
    try:
        import open_clip
    except ImportError:
        from pipeline.models.backbone import build_visual

        if backbone not in VISION_CFGS:
            raise SystemExit(
                f"open_clip is not installed and {backbone} is not one of {', '.join(VISION_CFGS)}"
            )
        return build_visual(VISION_CFGS[backbone])
    return open_clip.create_model(backbone, pretrained=None).visual


def clear(*paths: Path) -> None:
    """Remove earlier runs' outputs (files or Zarr folders), untimed."""
    import shutil

    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run(
    cmd: list[str], threads: int | None, extra_env: dict | None = None
) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds user + system) of one fresh process.

    On a shared machine the CPU time is the steadier figure: it excludes time spent waiting
    for a core, though not the cost of contended caches and memory bandwidth.

    The peak RSS is the child's own high-water mark (VmHWM of /proc/PID/status, polled every
    10 ms while it runs): the rusage figure of a child started by vfork + exec also counts the
    parent's high-water mark, which here holds the generated inputs (1.8 GB on a cold cache)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra_env or {})
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    err_chunks: list[str] = []
    drain = threading.Thread(
        target=lambda: err_chunks.append(proc.stderr.read() if proc.stderr else ""), daemon=True
    )
    drain.start()  # a full stderr pipe would block the child
    hwm = 0
    status_file = Path(f"/proc/{proc.pid}/status")
    while True:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm = max(hwm, int(line.split()[1]))  # kB
        except (OSError, ValueError):
            pass
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            raise SystemExit(f"benchmark command vanished: {' '.join(cmd)}")
        if pid:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    drain.join()
    err = "".join(err_chunks)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {' '.join(cmd)}\n{err}")
    peak_kb = hwm if hwm else usage.ru_maxrss  # no /proc (not Linux): the rusage figure
    return wall, peak_kb / 1024.0, usage.ru_utime + usage.ru_stime


def relative_distance(pretrained: str, approx: Path, exact: Path) -> float:
    """‖Δ_approx − Δ_exact‖ / ‖Δ_exact‖ over every floating tensor, Δ = merged − θ0 (float64 sums)."""
    from pipeline.store import open_tensors

    num = den = 0.0
    with open_tensors(pretrained) as p, open_tensors(approx) as a, open_tensors(exact) as e:
        for name in p.keys():
            theta0 = p.get(name)
            if not theta0.is_floating_point():
                continue
            d_exact = e.get(name).double() - theta0.double()
            num += float((a.get(name).double() - theta0.double() - d_exact).square().sum())
            den += float(d_exact.square().sum())
    return (num / den) ** 0.5 if den else 0.0


#: The package's command line in a fresh interpreter.
PIPELINE = [sys.executable, "-m", "pipeline"]

#: Columns of the CSV and the printed table, in order; the error columns follow where measured.
KEYS = [
    "spectrum",
    "case",
    "wall_s",
    "cpu_s",
    "peak_rss_mb",
    "gemm_gflops",
    "read_s",
    "basis_s",
    "hessian_s",
    "solve_s",
    "write_s",
    "prepare_s",
    "ratio_to_single",
    "cpu_ratio_to_single",
]


def _common(args: argparse.Namespace, paths: dict) -> list[str]:
    """The options every command of a family shares: its inputs, dtype, device, quiet."""
    return [
        "--pretrained",
        paths["pretrained"],
        "--finetuned",
        *paths["finetuned"],
        "--dtype",
        args.dtype,
        "--device",
        args.device,
        "-q",
    ]


#: The probe's product: a c_fc layer (3072 × 768) times a block of p = 256 columns, the shape of
#: the products in TSV-M's and EpiMer's heaviest stages (basis checks, R_S, CG) at T = 8, k = 32.
PROBE_SHAPE = (3072, 768, 256)


def gemm_rate(threads: int | None, device: str = "cpu", repeats: int = 15) -> float:
    """The machine's float32 GEMM rate now, in GFLOPS: the median of `repeats` products of
    PROBE_SHAPE on `device` (on the CPU with `threads` torch threads, the merge processes'
    OMP_NUM_THREADS; default: torch's). Taken just before each timed merge (≈ 0.3 s on two
    cores), so rows from different hours or machines can be compared at the rate they ran at."""
    import torch

    m, n, p = PROBE_SHAPE
    dev = torch.device(device)
    a = torch.randn(m, n, device=dev)
    b = torch.randn(n, p, device=dev)
    before = torch.get_num_threads()
    if threads and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        times = []
        for i in range(repeats + 2):  # two warm-up products
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            a @ b
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= 2:
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return 2.0 * m * n * p / statistics.median(times) / 1e9


def family_rows(
    args: argparse.Namespace, spectrum: str, paths: dict, work: Path, extras: bool
) -> list[dict]:
    """The rows of one spectral family: every method (and its exact-SVD reference), and where
    `extras`, the EpiMer solvers, Fisher ranks and the α sweeps."""
    work.mkdir(parents=True, exist_ok=True)
    alphas = [0.2, 0.3, 0.4, 0.5, 0.7, 1.0][: args.sweep if extras else 0]
    # The one-process sweep runs right after each single EpiMer merge, so its ratio compares
    # runs minutes apart, not the first and the last of the benchmark (the machine drifts).
    sweep = _OneProcessSweep(args, paths, work, alphas)
    rows = [
        _case_row(args, paths, work, case, method, extra, sweep)
        for case, method, extra in _cases(args, extras)
    ]
    _add_distances(rows, paths["pretrained"], work)
    if alphas and "epimer" in args.methods:
        single = next(r for r in rows if r["case"] == "epimer")
        rows += _sweep_rows(args, paths, work, sweep, single)
    return rows


def _cases(args: argparse.Namespace, extras: bool) -> list[tuple[str, str, list[str]]]:
    """(case, method, extra options) of every timed merge of a family."""
    cases = [(m, m, []) for m in args.methods]
    # The same merges with every truncated SVD on the exact path: the reference of `vs_exact`.
    cases += [
        (f"{m}_exact_svd", m, [])
        for m in ("tsvm", "epimer")
        if m in args.methods and args.exact_svd
    ]
    if "epimer" in args.methods and extras:
        cases += [(f"epimer_{solver}", "epimer", ["--solver", solver]) for solver in args.solvers]
        cases += [(f"epimer_r{r}", "epimer", ["--fisher-rank", str(r)]) for r in args.fisher_rank]
    return cases


class _OneProcessSweep:
    """The α values as one `merge --alpha a1 a2 ...` process from the inputs alone, timed after
    each single EpiMer merge (`runs`: one (wall, peak RSS, CPU) per run)."""

    def __init__(self, args: argparse.Namespace, paths: dict, work: Path, alphas: list) -> None:
        self.args, self.alphas = args, alphas
        self.outputs = [work / f"sweep_a{a}.zarr" for a in alphas]
        self.many = ["--alpha", *map(str, alphas), "--out", str(work / "sweep_a{alpha}.zarr")]
        self.cmd = [
            *PIPELINE,
            "merge",
            "epimer",
            *_common(args, paths),
            "--k",
            str(args.k),
            "--fisher",
            *paths["fisher"],
            *self.many,
        ]
        self.runs: list[tuple[float, float, float]] = []

    def run(self) -> None:
        clear(*self.outputs)
        self.runs.append(run(self.cmd, self.args.threads))


def _case_row(
    args: argparse.Namespace,
    paths: dict,
    work: Path,
    case: str,
    method: str,
    extra: list[str],
    sweep: _OneProcessSweep,
) -> dict:
    """One merge case run --repeats times: medians of wall, CPU and stage times, the largest
    peak RSS, and the solver's figures from its report."""
    from pipeline.methods import get_method

    cmd = [
        *PIPELINE,
        "merge",
        method,
        *_common(args, paths),
        "--k",
        str(args.k),
        "--out",
        str(work / f"{case}.safetensors"),
        "--report",
        str(work / f"{case}.json"),
        *extra,
    ]
    if get_method(method).needs_fisher != "none":
        cmd += ["--fisher", *paths["fisher"]]
    walls, rss, cpus, stages, rates = [], [], [], [], []
    for _ in range(args.repeats):
        clear(work / f"{case}.safetensors")
        rates.append(gemm_rate(args.threads, args.device))
        wall, peak, cpu = run(
            cmd, args.threads, {EXACT_ENV: "1"} if case.endswith("_exact_svd") else None
        )
        walls.append(wall)
        rss.append(peak)
        cpus.append(cpu)
        stages.append(json.loads((work / f"{case}.json").read_text())["timings_s"])
        if case == "epimer" and sweep.alphas:
            sweep.run()
    stage_median = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0]}
    row = {
        "case": case,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "peak_rss_mb": max(rss),
        "gemm_gflops": statistics.median(rates),
        **{f"{k}_s": v for k, v in stage_median.items()},
    }
    totals = json.loads((work / f"{case}.json").read_text())["totals"]
    if "fisher_rank_error" in totals:
        row["fisher_rank_error"] = totals["fisher_rank_error"]
    if "cg_residual" in totals:
        row["cg_residual"] = totals["cg_residual"]
        row["cg_steps"] = totals["cg_iterations"]
        row["h_formed"] = totals["cg_fallbacks"]
    print(f"{case}: {row['wall_s']:.1f} s at {row['gemm_gflops']:.0f} GFLOPS", file=sys.stderr)
    return row


def _add_distances(rows: list[dict], pretrained: str, work: Path) -> None:
    """`vs_exact`: every other EpiMer merge against the one that forms H̄ and solves by
    Cholesky; `vs_exact_svd`: TSV-M and EpiMer with the iterated basis against the exact path's."""
    dense = work / "epimer_dense.safetensors"
    for r in rows:
        if r["case"].startswith("epimer") and r["case"] != "epimer_dense" and dense.exists():
            r["vs_exact"] = relative_distance(pretrained, work / f"{r['case']}.safetensors", dense)
    for method in ("tsvm", "epimer"):
        exact_svd = work / f"{method}_exact_svd.safetensors"
        for r in rows:
            if r["case"] == method and exact_svd.exists():
                r["vs_exact_svd"] = relative_distance(
                    pretrained, work / f"{method}.safetensors", exact_svd
                )


def _sweep_rows(
    args: argparse.Namespace, paths: dict, work: Path, sweep: _OneProcessSweep, single: dict
) -> list[dict]:
    """The α sweep three ways, each row compared with the `single` EpiMer merge: the cached
    stages and one merge process per α, the cached stages and one `merge --alpha a1 a2 ...`
    process, and that process from the inputs alone (the runs after each single merge)."""
    n, common, fisher = len(sweep.alphas), _common(args, paths), ["--fisher", *paths["fisher"]]
    basis, hessian = work / "basis.zarr", work / "hessian.zarr"
    clear(basis, hessian)
    rate = {"gemm_gflops": gemm_rate(args.threads, args.device)}
    t_basis, r1, c1 = run(
        [*PIPELINE, "basis", *common, "--k", str(args.k), "--out", str(basis)], args.threads
    )
    # The sweep merges tagged coordinates only, so the hessian stage stores only those terms.
    t_hess, r2, c2 = run(
        [*PIPELINE, "hessian", *common, *fisher, "--basis", str(basis)]
        + ["--coords", "tagged", "--out", str(hessian)],
        args.threads,
    )
    cached = [*PIPELINE, "merge", "epimer", *common, *fisher, "--basis", str(basis)]
    cached += ["--hessian", str(hessian), "--k", str(args.k)]
    t_merges, peak, cpu = 0.0, max(r1, r2), c1 + c2
    for a in sweep.alphas:
        clear(work / f"sweep_single_a{a}.zarr")
        w, r, c = run(
            [*cached, "--alpha", str(a), "--out", str(work / f"sweep_single_a{a}.zarr")],
            args.threads,
        )
        t_merges += w
        peak = max(peak, r)
        cpu += c
    stages = {"basis_s": t_basis, "hessian_s": t_hess}
    total = t_basis + t_hess + t_merges
    rows = [
        _sweep_row(
            f"epimer sweep x{n} (cached)",
            total,
            cpu,
            peak,
            single,
            **rate,
            **stages,
            solve_s=t_merges,
        )
    ]
    clear(*sweep.outputs)
    w, r, c = run([*cached, *sweep.many], args.threads)
    total, cpu_total, peak = t_basis + t_hess + w, c1 + c2 + c, max(r1, r2, r)
    label = f"epimer sweep x{n} (cached, one merge)"
    rows.append(_sweep_row(label, total, cpu_total, peak, single, **rate, **stages, solve_s=w))
    wall = statistics.median(x[0] for x in sweep.runs)
    cpu = statistics.median(x[2] for x in sweep.runs)
    peak = max(x[1] for x in sweep.runs)
    # The one-process sweeps ran right after the single merges: their rates are that row's.
    rate = {"gemm_gflops": single["gemm_gflops"]}
    rows.append(_sweep_row(f"epimer sweep x{n} (one merge)", wall, cpu, peak, single, **rate))
    return rows


def _sweep_row(
    case: str, wall: float, cpu: float, peak: float, single: dict, **stages: float
) -> dict:
    """A sweep's row: its times, peak RSS, the GEMM rate and stage times (`stages`), and its
    ratios to one merge's."""
    return {
        "case": case,
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mb": peak,
        **stages,
        "ratio_to_single": wall / single["wall_s"],
        "cpu_ratio_to_single": cpu / single["cpu_s"],
    }


def layer_table(
    shape: tuple[int, int], tasks: int, k: int, repeats: int, spectra: list[str]
) -> None:
    """CPU seconds of one layer's T truncated SVDs (`truncated_svd_batch`) on one thread, per
    spectral family: the package's path and the exact path, medians of `repeats` runs each."""
    import torch

    from pipeline import subspace

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(
        f"layer {shape[0]} x {shape[1]}, T = {tasks}, k = {k}, one thread, CPU seconds (median of {repeats})"
    )
    print(f"{'spectrum':>16}  {'basis SVDs':>10}  {'exact path':>10}  {'vs exact':>9}")
    for spectrum in spectra:
        family = {"duplicated": "low-rank", "fisher-scales": "low-rank"}.get(spectrum, spectrum)
        batch = torch.stack([_task_vector(shape, family, g) for _ in range(tasks)])
        if spectrum == "duplicated":
            batch[tasks // 2 :] = batch[: tasks - tasks // 2].clone()
        times, exact = [], []
        for _ in range(repeats):  # alternating, so both see the same drift of the machine
            start = time.process_time()
            U, s, V = subspace.truncated_svd_batch(batch, k)
            times.append(time.process_time() - start)
            os.environ[subspace.EXACT_ENV] = "1"
            start = time.process_time()
            Ue, se, Ve = subspace.truncated_svd_batch(batch, k)
            exact.append(time.process_time() - start)
            del os.environ[subspace.EXACT_ENV]
        # Agreement of the rank-k reconstructions, the worst task (relative Frobenius norm).
        approx, ref = (U * s.unsqueeze(1)) @ V.mT, (Ue * se.unsqueeze(1)) @ Ve.mT
        gap = float(((approx - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max())
        print(
            f"{spectrum:>16}  {statistics.median(times):>10.2f}  {statistics.median(exact):>10.2f}"
            f"  {gap:>9.1e}",
            flush=True,
        )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--backbone", default="ViT-B-32", help="open_clip model name (ViT-B-32, ViT-B-16, ViT-L-14)"
    )
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--k", type=int, default=32)
    methods = ["ta", "ties", "fisher", "tsvm", "epimer", "isoc", "isocts", "gradmatch"]
    ap.add_argument("--methods", nargs="+", default=methods)
    ap.add_argument(
        "--repeats", type=int, default=3, help="runs per method; the table reports medians"
    )
    ap.add_argument(
        "--sweep", type=int, default=6, help="α values in the cached-sweep measurement (0 to skip)"
    )
    ap.add_argument(
        "--fisher-rank",
        type=int,
        nargs="*",
        default=[1, 4],
        metavar="R",
        help="also time EpiMer with H̄ from a rank-R factorisation of F̄, for each R (none: skip); "
        "reports the worst layer's ‖F̄ − F̂‖/‖F̄‖ and the merged update's distance to exact EpiMer",
    )
    ap.add_argument(
        "--solvers",
        nargs="*",
        default=["dense", "cg"],
        choices=["auto", "dense", "cg"],
        help="also time EpiMer with each of these --solver values (the `epimer` row is the default, auto); "
        "the others are compared with the dense one",
    )
    ap.add_argument(
        "--spectrum",
        nargs="+",
        default=list(SPECTRA),
        choices=list(SPECTRA),
        metavar="FAMILY",
        help="task-vector spectral families, each its own inputs and rows (default: all; the EpiMer "
        "solvers, Fisher ranks and sweeps run on the first): "
        + "; ".join(f"{k}: {v}" for k, v in SPECTRA.items()),
    )
    ap.add_argument(
        "--no-exact-svd",
        dest="exact_svd",
        action="store_false",
        help="skip the TSV-M and EpiMer merges with every truncated SVD on the exact path "
        "(the reference of the vs_exact_svd column)",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the merge processes"
    )
    ap.add_argument(
        "--device", default="cpu", help="--device of the merge/basis/hessian commands (cpu, cuda)"
    )
    ap.add_argument("--cache", default=str(REPO / "benchmarks" / "cache"))
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "merge.csv"))
    ap.add_argument(
        "--layer",
        type=int,
        nargs=2,
        metavar=("D_OUT", "D_IN"),
        help="only time one layer's truncated SVDs per spectral family, one thread, CPU seconds, "
        "against the exact path (e.g. --layer 3072 768, a c_fc layer)",
    )
    ap.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep each family's merged models and reports under work/ beside --out (by default "
        "removed once the family's rows are measured: 2-7 GB a family)",
    )
    return ap


def main() -> int:
    args = _parser().parse_args()
    if args.layer:
        layer_table(tuple(args.layer), args.tasks, args.k, args.repeats, args.spectrum)
        return 0
    rows = []
    for spectrum in args.spectrum:
        paths = generate(Path(args.cache), args.backbone, args.tasks, spectrum)
        first = spectrum == args.spectrum[0]
        work = Path(args.out).parent / "work" / spectrum
        for r in family_rows(args, spectrum, paths, work, extras=first):
            rows.append({"spectrum": spectrum, **r})
        if not args.keep_outputs:
            clear(work)  # the family's merged models: 2–7 GB
            if not any(work.parent.iterdir()):
                work.parent.rmdir()
    keys = _columns(rows)
    write_csv(Path(args.out), keys, rows)
    print_table(args, keys, rows)
    return 0


def _columns(rows: list[dict]) -> list[str]:
    """KEYS, and the error columns of the rows that measure them."""
    keys = list(KEYS)
    if any("vs_exact" in r for r in rows):
        keys += ["fisher_rank_error", "cg_residual", "cg_steps", "h_formed", "vs_exact"]
    if any("vs_exact_svd" in r for r in rows):
        keys += ["vs_exact_svd"]
    return keys


def write_csv(out: Path, keys: list[str], rows: list[dict]) -> None:
    """The rows as CSV, floats to 4 significant digits."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(
                {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in r.items()}
            )


def print_table(args: argparse.Namespace, keys: list[str], rows: list[dict]) -> None:
    """The settings line and the rows as a fixed-width table on stdout."""
    from pipeline.methods import ties

    ties_pass = "compiled" if ties.KERNEL is not None else "NumPy (the C extension is not built)"
    print(
        f"\n{args.backbone}, T = {args.tasks}, k = {args.k}, {args.dtype}, {args.device}, medians of {args.repeats}, TIES pass {ties_pass} (CSV: {args.out})"
    )
    print("  ".join(f"{k:>12}" for k in keys))
    for r in rows:
        print("  ".join(f"{_cell(r.get(k)):>12}" for k in keys))


def _cell(v: object) -> str:
    """Seconds and ratios to 2 decimals; small errors and residuals in scientific notation."""
    if not isinstance(v, float):
        return "" if v is None else str(v)
    return f"{v:.2e}" if v and abs(v) < 0.01 else f"{v:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())

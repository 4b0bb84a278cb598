"""fasthess against the peer libraries: same model, data and accuracy target, one process, one run.

Run (after ``bash benchmarks/install_peers.sh``)::

    PYTHONPATH=. .venv/bin/python benchmarks/compare_peers.py                 # CPU problems, writes PEERS.md
    PYTHONPATH=. .venv/bin/python benchmarks/compare_peers.py --problems cnn_cifar --no-write
    PYTHONPATH=. .venv/bin/python benchmarks/compare_peers.py --device cuda --problems vgg11_cifar

For every problem (benchmarks/problems.py) it computes a tightly converged float64 reference λ_max (cached in
benchmarks/.cache), then runs each tool cold, with the tool's own stopping rule at ``--tol``:

* fasthess: ``eigs`` (default block size and HVP method, chunk graphs kept between passes), the same with
  ``graph_memory=0`` (graphs rebuilt every pass, to show what keeping them saves) and
  ``fasthess.from_subset.eigs_subsampled`` (Lanczos on a random 1/8 of the data, then refined and certified on the
  full data);
* PyHessian: power iteration over a data loader (double-backward HVPs), ``eigenvalues(tol=tol)``;
* hessian-eigenthings 1.0: ``HessianOperator`` + ``lanczos`` (fixed step count: 10, 20, 40 steps are tried in
  turn and the first run that its own residual estimate calls converged is reported, the others not counted);
* curvlinops: ``HessianLinearOperator(...).to_scipy()`` + ``scipy.sparse.linalg.eigsh(k=1)``;
* the paper's method: double-backward HVPs + ARPACK ``eigsh(k=6)``; and the same with ``k=1`` (the baseline of
  the eigs ≤ ½ target).

Then the warm-start scenario: after every ``--sgd-steps`` SGD steps λ_max again, fasthess started from the previous
eigenvectors, against a cold fasthess solve and (first update only) a warm-started eigsh (curvlinops, ``v0`` =
previous vector). The float64 reference is cached, so a second run of the CPU problems takes ~8-10 min.

Cost is reported as wall seconds, HVPs, data passes and gradient-equivalents: seconds divided by the median time
of one full-data gradient pass, timed interleaved with the tools in the same run (so a busy machine inflates
both). Relative error is against the reference.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (ROOT, HERE / ".peers"):
    if path.exists() and str(path) not in sys.path:
        sys.path.insert(0 if path == ROOT else len(sys.path), str(path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.sparse.linalg import LinearOperator, eigsh  # noqa: E402

import fasthess  # noqa: E402
from fasthess import from_subset  # noqa: E402

try:
    from benchmarks import problems as P  # noqa: E402
except ImportError:  # run as a script from benchmarks/
    import problems as P  # type: ignore  # noqa: E402

CACHE = HERE / ".cache"


# ---------------------------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Gradient timings interleaved with the tools: the unit of cost in this run."""

    def __init__(self, p: P.Problem) -> None:
        self.p, self.times = p, []
        P.full_gradient(p)  # warm-up

    def tick(self) -> float:
        _sync(self.p.X.device)
        t = time.perf_counter()
        P.full_gradient(self.p)
        _sync(self.p.X.device)
        self.times.append(time.perf_counter() - t)
        return self.times[-1]

    @property
    def grad_s(self) -> float:
        return statistics.median(self.times)


def _timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def _batches(p: P.Problem):
    return p.batches()


class DoubleBackwardHVP:
    """The paper's HVP: per chunk, autograd of (gradient · v) with create_graph, weighted by chunk size."""

    def __init__(self, p: P.Problem) -> None:
        self.p = p
        self.params = [q for q in p.model.parameters() if q.requires_grad]
        self.n = sum(q.numel() for q in self.params)
        self.count = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.count += 1
        vs, off = [], 0
        for q in self.params:
            vs.append(v[off:off + q.numel()].view_as(q))
            off += q.numel()
        out = torch.zeros(self.n, dtype=v.dtype, device=v.device)
        N = self.p.X.shape[0]
        for xb, yb in _batches(self.p):
            loss = self.p.loss_fn(self.p.model(xb), yb)
            g = torch.autograd.grad(loss, self.params, create_graph=True)
            hv = torch.autograd.grad(g, self.params, vs)
            out += torch.cat([h.reshape(-1) for h in hv]) * (yb.shape[0] / N)
        return out

    def scipy(self) -> LinearOperator:
        dev, dt = self.p.X.device, self.params[0].dtype

        def mv(x):
            v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1), device=dev).to(dt)
            return self(v).double().cpu().numpy()

        return LinearOperator((self.n, self.n), matvec=mv, dtype=np.float64)


def _counting(A: LinearOperator) -> tuple[LinearOperator, list[int]]:
    n = [0]

    def mv(x):
        n[0] += 1
        return A.matvec(x)

    return LinearOperator(A.shape, matvec=mv, dtype=A.dtype), n


def _start_vector(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


# ---------------------------------------------------------------------------------------------- reference
def reference(p: P.Problem, quiet: bool = False, dtype: torch.dtype = torch.float64) -> dict:
    """λ_max of a ``dtype`` copy of the model and data, certified to ~1e-10 (float64) or ~1e-6 (float32), cached
    by the weights' hash. float32 is for problems too large for a float64 solve in a short GPU lease."""
    h = hashlib.sha256()
    for q in p.model.parameters():
        h.update(q.detach().cpu().double().numpy().tobytes())
    h.update(p.X.detach().cpu().numpy().tobytes()[:1 << 20])
    key = f"{p.name}-{h.hexdigest()[:16]}" + ("" if dtype == torch.float64 else f"-{str(dtype)[6:]}")
    f = CACHE / f"ref-{key}.json"
    if f.exists():
        return json.loads(f.read_text())
    model = copy.deepcopy(p.model).to(dtype)
    op = fasthess.HessianOperator(model, p.loss_fn, (p.X.to(dtype), p.y), batch_size=p.batch_size)
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    r = fasthess.eigs(op, k=2, tol=tol, block_size=3, seed=1, max_iters=300)
    out = {"lambda_max": float(r.eigenvalues[0]), "lambda_2": float(r.eigenvalues[1]),
           "bound": float(r.error_bounds[0]), "hvps": r.num_hvps, "key": key, "dtype": str(dtype)}
    CACHE.mkdir(exist_ok=True)
    f.write_text(json.dumps(out))
    if not quiet:
        print(f"  reference {out}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------- tools
def run_fasthess(p, tol, seed=0, graph_memory=None, **kw):
    op = fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size, graph_memory=graph_memory)
    r, s = _timed(lambda: fasthess.eigs(op, k=1, which="LA", tol=tol, seed=seed, **kw), p.X.device)
    return dict(lam=float(r.eigenvalues[0]), hvps=r.num_hvps, passes=r.num_passes, seconds=s,
                bound=float(r.error_bounds[0] / r.eigenvalues[0].abs()), vec=r.eigenvectors[:, 0])


def run_fasthess_sub(p, tol, seed=0, v0=None, **kw):
    op = fasthess.HessianOperator(p.model, p.loss_fn, p.data, batch_size=p.batch_size)
    r, s = _timed(lambda: from_subset.eigs_subsampled(op, k=1, tol=tol, seed=seed, v0=v0, **kw), p.X.device)
    f = r.result
    return dict(lam=float(f.eigenvalues[0]), hvps=f"{f.num_hvps}+{r.sub_result.num_hvps}×{r.fraction:.3g}",
                passes=round(r.full_pass_equivalents, 2), seconds=s,
                bound=float(f.error_bounds[0] / f.eigenvalues[0].abs()), vec=f.eigenvectors[:, 0])


def run_pyhessian(p, tol, seed=0, max_iter=200):
    from pyhessian import hessian

    torch.manual_seed(seed)
    h = hessian(p.model, p.loss_fn, dataloader=_batches(p), cuda=p.X.device.type == "cuda")
    calls = [0]
    inner = h.dataloader_hv_product

    def counted(v):
        calls[0] += 1
        return inner(v)

    h.dataloader_hv_product = counted
    (vals, _), s = _timed(lambda: h.eigenvalues(maxIter=max_iter, tol=tol, top_n=1), p.X.device)
    return dict(lam=float(vals[0]), hvps=calls[0], passes=calls[0], seconds=s)


def run_eigenthings(p, tol, seed=0, steps=(10, 20, 40)):
    import hessian_eigenthings as he

    def loss(model, batch):
        return p.loss_fn(model(batch[0]), batch[1])

    total_s = 0.0
    for m in steps:
        op = he.HessianOperator(p.model, _batches(p), loss)
        r, s = _timed(lambda: he.lanczos(op, k=1, which="LA", max_iter=m, tol=tol, seed=seed), p.X.device)
        total_s += s
        if bool(r.converged.all()):
            break
    return dict(lam=float(r.eigenvalues[0]), hvps=m, passes=m, seconds=s,
                note=f"max_iter={m} (first of {list(steps)} its residual estimate accepts; "
                     f"{total_s:.1f}s for all tries)")


def run_curvlinops(p, tol, seed=0, v0=None):
    from curvlinops import HessianLinearOperator

    params = [q for q in p.model.parameters() if q.requires_grad]

    def solve():
        H = HessianLinearOperator(p.model, p.loss_fn, params, _batches(p), check_deterministic=False,
                                  num_data=p.X.shape[0]).to_scipy()
        A, n = _counting(H)
        start = _start_vector(A.shape[0], seed) if v0 is None else v0.double().cpu().numpy()
        vals, vecs = eigsh(A, k=1, which="LA", tol=tol, v0=start.astype(A.dtype))
        return vals, vecs, n[0]

    (vals, vecs, n), s = _timed(solve, p.X.device)
    return dict(lam=float(vals.max()), hvps=n, passes=n, seconds=s,
                vec=torch.as_tensor(vecs[:, int(np.argmax(vals))], dtype=torch.float64))


def run_paper(p, tol, seed=0, k=6):
    def solve():
        hv = DoubleBackwardHVP(p)
        A = hv.scipy()
        vals, _ = eigsh(A, k=k, which="LA", tol=tol, v0=_start_vector(hv.n, seed))
        return vals, hv.count

    (vals, n), s = _timed(solve, p.X.device)
    return dict(lam=float(vals.max()), hvps=n, passes=n, seconds=s)


COLD_TOOLS = {
    "fasthess eigs": ("fasthess", "block Lanczos (k + 1 on CPU), default HVP method and kept graphs, certified",
                      run_fasthess),
    "fasthess eigs, graphs rebuilt": ("fasthess", "as above with graph_memory=0 (every pass rebuilds the graphs)",
                                      lambda p, tol, seed=0: run_fasthess(p, tol, seed, graph_memory=0)),
    "fasthess subsampled": ("fasthess", "Lanczos on 1/8 of data, then certified on full data",
                            run_fasthess_sub),
    "PyHessian": ("peer", "power iteration, double backward", run_pyhessian),
    "hessian-eigenthings": ("peer", "HessianOperator + lanczos", run_eigenthings),
    "curvlinops + eigsh": ("peer", "HessianLinearOperator + ARPACK eigsh(k=1)", run_curvlinops),
    "paper: dbl-bwd + eigsh k=6": ("peer", "double-backward HVP + ARPACK eigsh(k=6)", run_paper),
    "dbl-bwd + eigsh k=1": ("peer", "double-backward HVP + ARPACK eigsh(k=1)",
                            lambda p, tol, seed=0: run_paper(p, tol, seed, k=1)),
}


def _available(tool: str) -> bool:
    mod = {"PyHessian": "pyhessian", "hessian-eigenthings": "hessian_eigenthings",
           "curvlinops + eigsh": "curvlinops"}.get(tool)
    if mod is None:
        return True
    try:
        __import__(mod)
        return True
    except Exception as e:  # noqa: BLE001
        print(f"  {tool}: not installed ({type(e).__name__}: {e}); run benchmarks/install_peers.sh", flush=True)
        return False


# ---------------------------------------------------------------------------------------------- scenarios
def warm_up_autograd(device) -> None:
    """One-time process costs (torch.func, autograd graph machinery) paid on a throw-away model before timing."""
    from torch import nn

    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(device)
    X, y = torch.randn(16, 3, 8, 8, device=device), torch.randint(0, 3, (16,), device=device)
    for hvp in ("forward-over-reverse", "double-backward"):
        op = fasthess.HessianOperator(m, nn.CrossEntropyLoss(), (X, y), batch_size=8, hvp=hvp)
        op.matmat(torch.randn(op.num_params, 2, dtype=torch.float64, device=device))


def cold(p: P.Problem, tol: float, tools: list[str], ref: dict, repeats: int = 1) -> list[dict]:
    """Each tool ``repeats`` times, round-robin (so load changes hit all tools alike); the fastest run is kept."""
    clock = Clock(p)
    best: dict[str, dict] = {}
    tools = [t for t in tools if _available(t)]
    for rep in range(repeats):
        for name in tools:
            kind, method, fn = COLD_TOOLS[name]
            before = clock.tick()
            out = fn(p, tol)
            after = clock.tick()
            out.pop("vec", None)
            out.update(tool=name, kind=kind, method=method, problem=p.name,
                       rel_err=abs(out["lam"] - ref["lambda_max"]) / abs(ref["lambda_max"]),
                       local_grad_s=(before + after) / 2, runs=rep + 1)
            print(f"  [{rep + 1}/{repeats}] {name:28s} {out['seconds']:8.2f}s hvps={out['hvps']!s:>9} "
                  f"λ={out['lam']:.6f} rel_err={out['rel_err']:.1e} "
                  f"({out['seconds'] / out['local_grad_s']:.1f} local grad-eq)", flush=True)
            if name not in best or out["seconds"] < best[name]["seconds"]:
                best[name] = out
            best[name]["runs"] = rep + 1
    rows = [best[t] for t in tools]
    for r in rows:
        r["grad_s"] = clock.grad_s
        r["grad_eq"] = r["seconds"] / clock.grad_s
    return rows


def warm_scenario(p: P.Problem, tol: float, updates: int, sgd_steps: int, peers: bool) -> list[dict]:
    clock = Clock(p)
    prev = run_fasthess(p, tol)["vec"]
    prev_lam = None
    rows = []
    for u in range(updates):
        P.sgd_steps(p, sgd_steps)
        row = {"update": u + 1, "step": p.step}
        clock.tick()
        c = run_fasthess(p, tol, seed=u)
        w = run_fasthess(p, tol, seed=u, v0=prev)
        clock.tick()
        ws = run_fasthess_sub(p, tol, seed=u, v0=prev)
        clock.tick()
        row["cold"] = {k: c[k] for k in ("lam", "hvps", "passes", "seconds", "bound")}
        row["warm"] = {k: w[k] for k in ("lam", "hvps", "passes", "seconds", "bound")}
        row["warm_sub"] = {k: ws[k] for k in ("lam", "hvps", "passes", "seconds", "bound")}
        if peers and u == 0 and _available("curvlinops + eigsh"):  # once: ARPACK gains nothing from v0
            e = run_curvlinops(p, tol, seed=u, v0=prev)
            row["eigsh_warm"] = {k: e[k] for k in ("lam", "hvps", "passes", "seconds")}
            clock.tick()
        row["lam_change"] = None if prev_lam is None else abs(c["lam"] - prev_lam) / abs(prev_lam)
        row["warm_vs_cold"] = abs(w["lam"] - c["lam"]) / abs(c["lam"])
        prev, prev_lam = w["vec"], c["lam"]
        rows.append(row)
        print(f"  update {u + 1}: λ={c['lam']:.5f} cold {c['hvps']} HVPs {c['seconds']:.2f}s | warm {w['hvps']} HVPs "
              f"{w['seconds']:.2f}s | warm-sub {ws['passes']} passes {ws['seconds']:.2f}s"
              + (f" | eigsh warm {row['eigsh_warm']['hvps']} HVPs {row['eigsh_warm']['seconds']:.2f}s"
                 if "eigsh_warm" in row else ""), flush=True)
    g = clock.grad_s
    for r in rows:
        r["grad_s"] = g
        for key in ("cold", "warm", "warm_sub", "eigsh_warm"):
            if key in r:
                r[key]["grad_eq"] = r[key]["seconds"] / g
    return rows


# ---------------------------------------------------------------------------------------------- report
def cold_table(rows: list[dict], tol: float) -> str:
    out = ["| problem | tool | method | seconds | HVPs | passes | rel. error | grad-eq | ≤ tol | time / fasthess |",
           "|---|---|---|---:|---:|---:|---:|---:|:-:|---:|"]
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == prob]
        base = next((r["seconds"] for r in rs if r["tool"] == "fasthess eigs"), None)
        for r in rs:
            rel = f"{r['seconds'] / base:.2f}" if base else ""
            out.append(f"| {prob} | {r['tool']} | {r['method']} | {r['seconds']:.2f} | {r['hvps']} | {r['passes']} | "
                       f"{r['rel_err']:.1e} | {r['grad_eq']:.1f} | {'yes' if r['rel_err'] <= tol else 'no'} | {rel} |")
    return "\n".join(out)


def targets(rows: list[dict], tol: float) -> str:
    out = []
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = {r["tool"]: r for r in rows if r["problem"] == prob}
        peers = [r for r in rs.values() if r["kind"] == "peer" and r["rel_err"] <= tol]
        ours = [r for r in rs.values() if r["kind"] == "fasthess" and r["rel_err"] <= tol]
        if not peers or not ours:
            continue
        best_peer = min(peers, key=lambda r: r["seconds"])
        best = min(ours, key=lambda r: r["seconds"])
        ratio = best["seconds"] / best_peer["seconds"]
        out.append(f"- **{prob}**: fastest peer at ≤ {tol:g}: {best_peer['tool']} {best_peer['seconds']:.2f} s "
                   f"({best_peer['grad_eq']:.0f} grad-eq, {best_peer['hvps']} HVPs); fastest fasthess: {best['tool']} "
                   f"{best['seconds']:.2f} s ({best['grad_eq']:.0f} grad-eq) → ratio **{ratio:.2f}** (target ≤ 0.33: "
                   f"{'met' if ratio <= 1 / 3 else 'not met'})")
        db = rs.get("dbl-bwd + eigsh k=1")
        fe = rs.get("fasthess eigs")
        if db and fe:
            r2 = fe["seconds"] / db["seconds"]
            out.append(f"  - eigs ≤ ½ of eigsh(k=1): fasthess eigs {fe['seconds']:.2f} s / {fe['hvps']} HVPs / {fe['passes']} passes vs "
                       f"eigsh(k=1) over double backward {db['seconds']:.2f} s / {db['hvps']} HVPs → ratio **{r2:.2f}** "
                       f"(target ≤ 0.5: {'met' if r2 <= 0.5 else 'not met'})")
    return "\n".join(out)


def warm_table(rows: list[dict], prob: str) -> str:
    out = [f"Warm-start scenario, {prob}: λ_max again after every SGD block, tol as above.", "",
           "| update | step | λ_max | Δλ vs previous | cold HVPs / grad-eq | warm HVPs / grad-eq | "
           "warm-subsampled passes / grad-eq | eigsh warm HVPs / grad-eq | warm rel. bound |",
           "|---:|---:|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        e = r.get("eigsh_warm")
        lc = "" if r["lam_change"] is None else f"{100 * r['lam_change']:.1f} %"
        out.append(f"| {r['update']} | {r['step']} | {r['cold']['lam']:.5f} | {lc} | {r['cold']['hvps']} / "
                   f"{r['cold']['grad_eq']:.1f} | {r['warm']['hvps']} / {r['warm']['grad_eq']:.1f} | "
                   f"{r['warm_sub']['passes']} / {r['warm_sub']['grad_eq']:.1f} | "
                   + (f"{e['hvps']} / {e['grad_eq']:.1f}" if e else "") + f" | {r['warm']['bound']:.1e} |")
    med = {k: statistics.median(r[k]["grad_eq"] for r in rows) for k in ("cold", "warm", "warm_sub")}
    best = min(("warm", "warm_sub"), key=med.get)
    out += ["", f"Median gradient-equivalents: cold {med['cold']:.1f}, warm {med['warm']:.1f}, warm-subsampled "
            f"{med['warm_sub']:.1f}; best warm / cold = **{med[best] / med['cold']:.2f}** (target ≤ 0.5), best warm "
            f"median **{med[best]:.1f}** grad-eq (stretch target ≤ 6)."]
    return "\n".join(out)


def write_peers_md(text: str, path: Path) -> None:
    start, end = "<!-- compare_peers:start -->", "<!-- compare_peers:end -->"
    block = f"{start}\n{text}\n{end}"
    if path.exists():
        old = path.read_text()
        if start in old and end in old:
            path.write_text(old[:old.index(start)] + block + old[old.index(end) + len(end):])
            return
        path.write_text(old.rstrip() + "\n\n" + block + "\n")
    else:
        path.write_text("# fasthess vs peers\n\n" + block + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="+", default=None)
    ap.add_argument("--tools", nargs="+", default=list(COLD_TOOLS), choices=list(COLD_TOOLS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="threads of numpy's and scipy's own BLAS (ARPACK's vector work in the eigsh peers); 0 keeps "
                         "their default. Default 1: on 2 cores their threads spin against torch's and slowed the eigsh "
                         "peers 1.5-3x (measured), which would flatter fasthess")
    ap.add_argument("--repeats", type=int, default=1, help="round-robin repetitions of the cold runs (min kept)")
    ap.add_argument("--warm-updates", type=int, default=3)
    ap.add_argument("--sgd-steps", type=int, default=10)
    ap.add_argument("--no-warm", action="store_true")
    ap.add_argument("--reference-dtype", choices=("float64", "float32"), default="float64",
                    help="precision of the reference λ_max (float32: for VGG-11 in a short GPU lease)")
    ap.add_argument("--out", type=Path, default=HERE / "PEERS.md")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.blas_threads:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=a.blas_threads, user_api="blas")
    problems = a.problems or (list(P.PROBLEMS) + (list(P.GPU_PROBLEMS) if a.device == "cuda" else []))
    t_start = time.perf_counter()
    all_cold, warm_md = [], []
    meta = (f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {a.device}, "
            f"{torch.get_num_threads()} threads (numpy/scipy BLAS: {a.blas_threads or 'default'}), "
            f"{platform.processor() or platform.machine()}, "
            f"load average {os.getloadavg()[0]:.1f} at start")
    print(meta, flush=True)
    warm_up_autograd(a.device)
    for name in problems:
        p = P.make(name, device=a.device)
        print(f"== {name}: {p.num_params} parameters, {p.X.shape[0]} examples, chunk {p.batch_size}", flush=True)
        ref = reference(p, dtype=getattr(torch, a.reference_dtype))
        rows = cold(p, a.tol, a.tools, ref, a.repeats)
        for r in rows:
            r["ref"] = ref["lambda_max"]
        all_cold += rows
        if not a.no_warm:
            w = warm_scenario(P.make(name, device=a.device), a.tol, a.warm_updates, a.sgd_steps, peers=True)
            warm_md.append(warm_table(w, name))
            all_cold.append({"problem": name, "warm": w, "tool": "_warm"})
    cold_rows = [r for r in all_cold if r["tool"] != "_warm"]
    text = "\n\n".join([f"Run: {meta}; tol = {a.tol:g}; total {time.perf_counter() - t_start:.0f} s.",
                        cold_table(cold_rows, a.tol), targets(cold_rows, a.tol), *warm_md])
    print("\n" + text)
    if a.json:
        a.json.write_text(json.dumps(all_cold, indent=1, default=str))
    if not a.no_write:
        write_peers_md(text, a.out)
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

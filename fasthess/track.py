"""Track the sharpness λ_max of the full training loss during training, warm-started between calls.

Usage inside any training loop::

    tracker = SharpnessTracker(torch.nn.functional.cross_entropy, (X, y), batch_size=128, budget=0.1)
    for step in range(num_steps):
        train_step(...)
        rec = tracker.maybe_update(model, step, optimizer=opt)   # a record while within budget, else None
    tracker.latest.lambda_max, tracker.latest.error_bound, tracker.latest.threshold

Each update builds a :class:`fasthess.HessianOperator` on the model's current weights and certifies λ_max on the
full data, and returns a :class:`fasthess.SharpnessRecord`. By default every update is a cold solve
(:func:`fasthess.eigs` from fresh random columns, its certificate exactly), and what keeps tracking cheap is how
often it runs: ``budget=0.1`` computes only while the tracker stays within a tenth of the loop's wall time.

Warm starts are opt-in (``warm_start=True``), because on the CPU they no longer save products: an update carries
the previous Ritz vectors next to a fresh random column, and the carried vectors converge in a pass or two, but the
claim must wait until the random column has explored as far as a cold solve's would (three passes, no threatening
Ritz value, a frontier that has stopped climbing: :mod:`fasthess._certificate`); docs/guides/tracking.md has the
measured cost. And they keep a false-record class the cold solve does not have (a direction that rises from deep
in the bulk past the top between two updates, above all over a plateau of eigenvalues; rates in the same guide).
How a warm update explores (``explore``):

* ``"full"``: the fresh random column runs on the full data.
* ``"subsample"`` (in-memory ``(X, y)`` data): a solve on a fresh random 1/8 of the examples, started from the
  previous update's Ritz vectors plus a fresh random column, explores; the full-data solve then starts from the
  previous top k vectors and k more columns that add the previous (k+1)-th vector to the subset's top Ritz vectors,
  with no further random column (:func:`fasthess.from_subset.eigs_subsampled` with ``keep_v0=True``): cheaper, and
  blind to a direction carried by examples the subset misses. The record's ``basis`` says so.

The Hessian is taken in ``mode="train"`` by default (BatchNorm uses per-chunk "ghost batch" statistics over chunks
of ``batch_size``; running statistics are never changed) with dropout modules switched off
(``disable_dropout=True``), so the operator is a fixed matrix; a model whose forward draws random numbers another
way (e.g. functional attention dropout in Hugging Face models) needs ``mode="eval"``. The model's train/eval flags
are restored afterwards.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fasthess import _progress
from fasthess._data import is_batched_iterable
from fasthess.errors import FasthessError, StochasticModelError
from fasthess.records import SharpnessRecord, check_extra
from fasthess.results import WARM_START
from fasthess.threshold import stability_threshold

__all__ = ["SharpnessTracker", "sharpness_mode"]


#: eigs arguments the tracker sets itself on every update
_OWN_EIGS_ARGS = ("op", "k", "which", "tol", "v0", "progress", "random_columns")
EXPLORE = ("subsample", "full")
FRACTION = 0.125  # share of the examples the exploring subset solve reads


def _check_eigs_kwargs(k: int, tol: float, eigs_kwargs: dict[str, Any]) -> None:
    """Refuse, when the tracker is built, what :func:`fasthess.eigs` would refuse at the first update (possibly hours
    of training later): unknown or reserved names and invalid values; the first update is cold, so its block is
    ``block_size`` as given."""
    import inspect

    from fasthess.lanczos import check_block, check_options, eigs

    known = set(inspect.signature(eigs).parameters) - set(_OWN_EIGS_ARGS)
    bad = sorted(set(eigs_kwargs) - known)
    if bad:
        raise FasthessError(f"SharpnessTracker got unknown argument(s) {bad}; it passes to fasthess.eigs only "
                            f"{sorted(known)} (k, tol and progress are its own arguments; random_columns follows "
                            "from explore=)")
    opts = {name: eigs_kwargs[name] for name in ("block_size", "max_iters", "max_basis") if name in eigs_kwargs}
    check_options(k, "LA", tol, **opts)
    if opts.get("block_size") is not None:
        check_block(opts["block_size"], k, opts["block_size"])


@contextlib.contextmanager
def sharpness_mode(model: torch.nn.Module, mode: str = "train", disable_dropout: bool = True):
    """Put ``model`` in ``mode`` ("train" or "eval"), dropout off if asked, and restore every module's flag after."""
    if mode not in ("train", "eval"):
        raise FasthessError(f"mode must be 'train' or 'eval', got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        if disable_dropout:
            for m in model.modules():
                if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                    m.eval()
        yield model
    finally:
        for m, f in flags:
            m.training = f


def _params_of(params, model: torch.nn.Module):
    """The parameter list of an update: ``params`` itself, or a callable's list, called with ``model`` when it takes
    a positional argument (``lambda model: list(model.head.parameters())``), else with none."""
    if not callable(params):
        return params
    try:
        takes = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                    for p in inspect.signature(params).parameters.values())
    except (TypeError, ValueError):  # no signature to read (a builtin): call it as documented before
        takes = False
    return params(model) if takes else params()


def _materialize(params):
    """A list for any iterable of parameters (a generator would be exhausted by the first update), the callable
    or None as given."""
    if params is None or callable(params) or isinstance(params, (list, tuple)):
        return params
    if isinstance(params, torch.Tensor):
        raise FasthessError("params must be a list of parameters (or a callable returning one), not one tensor; "
                            "pass params=[p]")
    try:
        return list(params)
    except TypeError:
        raise FasthessError(f"params must be a list of parameters or a callable returning one, got "
                            f"{type(params).__name__}") from None


def _basis(out) -> str:
    """What the record's claim that θ₁ is λ_max (the Krylov assumption) rests on."""
    if out.sub_result is not None and out.sub_result.all_converged:
        return f"explored at this update on a {out.fraction:.3g} subsample"
    if out.result.start == WARM_START:
        return ("explored on the full data at this update from a warm start (assumes the random column explored "
                "past the previous vectors)")
    return "explored on the full data at this update"


def _rule_text(rule) -> str | None:
    if rule is None:
        return None
    if rule.operator == "hessian":
        return rule.rule
    return f"{rule.rule} = {rule.value:.6g}, for the preconditioned λ_max(P⁻¹H), not this λ_max(H)"


def _geometry(vectors: torch.Tensor, gradient: torch.Tensor | None, previous: torch.Tensor | None) -> dict[str, Any]:
    """``gradient_fraction`` ‖Vᵀg‖²/‖g‖² for the orthonormal eigenvectors V (n, k) (None without a gradient), and
    ``top_overlap`` |⟨x₁, x₁'⟩| with the previous update's top Ritz vector (the first column of ``previous``), or
    None."""
    V = vectors.detach().double()
    fraction = None
    if gradient is not None:
        g = gradient.detach().double().to(V.device)
        norm2 = float(g @ g)
        fraction = float((V.T @ g).pow(2).sum()) / norm2 if norm2 > 0 else None
    top = V[:, 0].cpu()
    return {"gradient_fraction": fraction,
            "top_overlap": None if previous is None else abs(float(previous[:, 0].double() @ top))}


def _record(out, *, step: int | None, previous: SharpnessRecord | None, lr: float | None, rule, warm: bool,
            geometry: dict[str, Any], extra: dict[str, Any]) -> SharpnessRecord:
    """The record of one update: its solve ``out`` (a :class:`fasthess.from_subset.SubsampledEigResult`), the step, the
    previous record, the learning rate and its threshold ``rule``, and the geometry fields."""
    res, sub = out.result, out.sub_result
    ev = res.eigenvalues.detach().cpu().double()
    sub_hvps = 0 if sub is None else int(sub.num_hvps)
    return SharpnessRecord(
        step=step,
        steps_since=None if step is None or previous is None or previous.step is None else step - previous.step,
        lambda_max=float(ev[0]),
        eigenvalues=tuple(float(e) for e in ev),
        residual=_as_float(res.residuals),
        error_bound=_as_float(res.error_bounds),
        converged=bool(torch.as_tensor(res.converged).all()),
        certificate=res.certificates[0],
        certificates=tuple(res.certificates),
        basis=_basis(out),
        precision=res.precision,
        contract=res.contract,
        num_hvps=int(res.num_hvps),
        num_passes=int(res.num_passes),
        subset_hvps=sub_hvps,
        hvp_equivalents=int(res.num_hvps) + out.fraction * sub_hvps,
        seconds=float(out.seconds),
        warm_started=bool(warm),
        lr=lr,
        threshold=rule.value if rule is not None and rule.operator == "hessian" else None,
        threshold_rule=_rule_text(rule),
        **geometry,
        extra=dict(extra),
    )


def _update_line(rec: SharpnessRecord, tol: float, share: float) -> str:
    """One update in words, for the ``progress`` display."""
    rel = rec.error_bound / max(abs(rec.lambda_max), 1e-300)
    claim = (f"λ_max {rec.lambda_max:.6g} certified" if rec.converged else
             f"λ_max ≈ {rec.lambda_max:.6g} NOT certified") + f" ({_progress.bound_text(rel, tol)})"
    at = "" if rec.step is None else f" at step {rec.step}"
    threshold = "" if rec.threshold is None else f", threshold {rec.threshold:.6g} ({rec.threshold_rule})"
    return (f"SharpnessTracker{at}: {claim}{threshold}, {rec.hvp_equivalents:.4g} HVPs, {rec.seconds:.2f} s "
            f"({share:.1%} of the wall time so far)")


def _as_float(x) -> float:
    if isinstance(x, torch.Tensor):
        return float(x.detach().reshape(-1)[0].item()) if x.numel() else float("nan")
    return float(x)


class SharpnessTracker:
    """λ_max (and optionally the top-k eigenvalues) of the training loss, computed every ``every`` steps or within
    a time ``budget``.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        data: what :class:`fasthess.HessianOperator` accepts: an ``(X, y)`` tuple, a Dataset or an
            iterable of batches. The Hessian is that of the mean loss over all of it.
        batch_size: chunk size of the Hessian-vector products (also the BatchNorm ghost-batch size
            in train mode; use the training batch size to match the paper).
        k: number of top eigenvalues.
        tol: relative tolerance for :func:`fasthess.eigs`.
        every: ``maybe_update(model, step)`` considers steps with ``step % every == 0``.
        budget: with ``maybe_update`` called every step, compute only while the tracker's own time stays within
            this fraction of the wall time since it was built (measured, so it adapts to the model and machine):
            a step is taken when the last update's cost, added now, would keep the share at or below ``budget``.
        explore: how a warm update explores, ``"full"`` (default) or ``"subsample"`` (module docstring); every
            record's ``basis`` says which was used. A cold update (each one without ``warm_start``, else the first)
            is :func:`fasthess.eigs`.
        geometry: fill the record field ``gradient_fraction`` = ‖Vₖᵀg‖²/‖g‖², the share of the full-data gradient g
            in the span of the top-k eigenvectors Vₖ (Gur-Ari et al., 2018; one extra gradient pass). Every record
            has ``top_overlap`` = |⟨x₁(t), x₁(t')⟩|, how far the top eigenvector turned since the previous update
            (None at the first one; free). Both are as accurate as the eigenvectors (their angle error is about
            √(error_bound/gap)).
        mode, disable_dropout: see :func:`sharpness_mode`.
        warm_start: start each solve from the previous top k + 1 Ritz vectors (opt-in: on the CPU it costs about
            what a cold solve costs and keeps a measured false-record class; module docstring).
        params: the parameters to differentiate (a list, or a callable returning one, called with the model
            being updated when it takes an argument, else with none); a generator such as
            ``model.parameters()`` is materialized once, here.
        lr: default learning rate, for the threshold when no optimizer is passed to ``update`` (2/lr).
        distributed, process_group: passed to :class:`fasthess.HessianOperator`: each process of the group
            passes its own shard as ``data`` and every process must call ``update``/``compute`` at the same
            steps (a collective; the results are identical on all processes).
        batch, penalty, graph_memory: passed to :class:`fasthess.HessianOperator` (the batch layout as a
            :class:`fasthess.BatchSpec`, a penalty added to the loss, the kept-graph budget).
        loggers: callables, each called with every new :class:`fasthess.SharpnessRecord` after it is appended to
            the history (e.g. :class:`fasthess.integrations.tensorboard.TensorBoardSink`).
        progress: show each solve's passes (:mod:`fasthess._progress`) and one line per update on stderr; ``None``:
            only when stderr is a terminal. Off by default: a training loop usually has its own display.
        eigs_kwargs: passed to :func:`fasthess.eigs` (``block_size``, ``max_iters``, ``seed``, ...).
    """

    def __init__(self, loss_fn, data, *, batch_size: int | None = None, k: int = 1, tol: float = 1e-4,
                 every: int = 1, budget: float | None = None, explore: str = "full", geometry: bool = False,
                 mode: str = "train",
                 disable_dropout: bool = True, warm_start: bool = False, params=None, lr: float | None = None,
                 allow_stochastic: bool = False, progress: bool | None = False, distributed: bool = False,
                 process_group=None, loggers: Sequence[Callable[[SharpnessRecord], None]] = (), batch=None,
                 penalty: Callable | None = None, graph_memory: int | None = None, **eigs_kwargs: Any) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise FasthessError(f"every must be an integer >= 1, got {every!r}")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or not 0 < budget <= 1):
            raise FasthessError(f"budget={budget!r} must be a fraction of the wall time in (0, 1], e.g. 0.1")
        if explore not in EXPLORE:
            raise FasthessError(f"explore={explore!r} must be one of {EXPLORE}: 'subsample' explores each update on "
                                "a random 1/8 of the examples, 'full' on all of them (as a cold solve)")
        if mode not in ("train", "eval"):
            raise FasthessError(f"mode must be 'train' or 'eval', got {mode!r}")
        _check_eigs_kwargs(k, tol, eigs_kwargs)
        if batch_size is not None and is_batched_iterable(data):  # the operator would refuse it at the first update
            raise FasthessError("batch_size was given together with an iterable of batches (a DataLoader, a list of "
                                "batches), whose own batches are the chunks; drop batch_size, or pass a Dataset or "
                                "a tuple (X, y) to be chunked by batch_size")
        self.loss_fn = loss_fn
        self.data = data
        self.batch_size = batch_size
        self.k = k
        self.tol = tol
        self.every = every
        self.budget = budget
        self.explore = explore
        self.geometry = geometry
        self.mode = mode
        self.disable_dropout = disable_dropout
        self.warm_start = warm_start
        self.params = _materialize(params)
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float))):
            raise FasthessError(f"lr={lr!r} must be a number (the learning rate), e.g. lr=0.1")
        self.lr = lr
        self.allow_stochastic = allow_stochastic
        self.progress = progress
        self.distributed, self.process_group = distributed, process_group
        self.eigs_kwargs = eigs_kwargs
        self.loggers = list(loggers)
        self.operator_kwargs = {"batch": batch, "penalty": penalty, "graph_memory": graph_memory}
        self.history: list[SharpnessRecord] = []
        self._vectors: torch.Tensor | None = None  # (n, k + 1) float64 on CPU
        self._born = time.perf_counter()
        self._spent = 0.0  # seconds inside update, for the budget
        self._last_cost = 0.0

    # ------------------------------------------------------------------ computing
    def should_update(self, step: int) -> bool:
        """``step % every == 0`` and, with a budget, (spent + last cost) ≤ budget·(elapsed + last cost)."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise FasthessError(f"step={step!r} must be an integer (the training step); call update(model) to "
                                "compute without one")
        if step % self.every:
            return False
        if self.budget is None or not self.history:
            return True
        elapsed = time.perf_counter() - self._born
        return self._spent + self._last_cost <= self.budget * (elapsed + self._last_cost)

    def maybe_update(self, model: torch.nn.Module, step: int, **kw) -> SharpnessRecord | None:
        """``update(model, step)`` when :meth:`should_update`, else None."""
        return self.update(model, step=step, **kw) if self.should_update(step) else None

    def compute(self, model: torch.nn.Module, v0: torch.Tensor | None = None):
        """One certified solve on the model's current weights, explored as ``explore`` says; returns the full-data
        :class:`fasthess.EigResult`. Does not touch the history or the warm-start vectors."""
        return self._explore_and_certify(model, v0)[0].result

    def _explore_and_certify(self, model: torch.nn.Module, v0: torch.Tensor | None, gradient: bool = False):
        """:meth:`compute` as a :class:`fasthess.from_subset.SubsampledEigResult` (``sub_result``: the exploring subset
        solve, or None when the exploration ran on the full data), and the full-data gradient when asked for
        (None otherwise)."""
        self._check_batchnorm_chunks(model)
        try:
            with sharpness_mode(model, self.mode, self.disable_dropout):
                return self._solve(model, v0, gradient)
        except StochasticModelError as err:
            if self.mode == "eval":
                raise
            raise StochasticModelError(
                f"{err}\nSharpnessTracker: in mode='train' the model stays random after its dropout modules "
                "are switched off (e.g. functional dropout, as in Hugging Face attention); pass "
                "SharpnessTracker(..., mode='eval'), which switches every module to eval") from err

    def _solve(self, model: torch.nn.Module, v0: torch.Tensor | None, gradient: bool):
        import fasthess
        from fasthess.from_subset import SubsampledEigResult, eigs_subsampled

        kw = {}
        if self.params is not None:
            kw["params"] = _params_of(self.params, model)
        op = fasthess.HessianOperator(model, self.loss_fn, self.data, batch_size=self.batch_size,
                                      allow_stochastic=self.allow_stochastic, distributed=self.distributed,
                                      process_group=self.process_group, **self.operator_kwargs, **kw)
        if v0 is not None and v0.shape[0] != op.num_params:
            v0 = None
        if v0 is not None:
            v0 = v0.to(device=getattr(op, "device", v0.device), dtype=torch.float64)
        kw = dict(self.eigs_kwargs)  # a new random column and subset every update: the same could miss again
        seed = kw.pop("seed", 0) + len(self.history)
        if v0 is None or self.explore == "full":
            res = fasthess.eigs(op, k=self.k, which="LA", tol=self.tol, v0=v0, progress=self.progress, seed=seed,
                                **kw)
            out = SubsampledEigResult(result=res, sub_result=None, fraction=0.0, seconds=res.seconds)
        else:
            out = eigs_subsampled(op, k=self.k, tol=self.tol, fraction=FRACTION, v0=v0, seed=seed,
                                  progress=self.progress, keep_v0=True, **kw)
        return out, (op.gradient() if gradient else None)

    def _check_batchnorm_chunks(self, model: torch.nn.Module) -> None:
        """Train mode normalizes each chunk by its own statistics, so the chunk size must be chosen."""
        has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if has_bn and self.mode == "train" and self.batch_size is None and not is_batched_iterable(self.data):
            raise FasthessError(
                "the model has BatchNorm and the tracker takes the Hessian in train mode, where each chunk is "
                "normalized by its own statistics; pass SharpnessTracker(..., batch_size=<the training batch size>), "
                "or mode='eval' to use the running statistics")

    def update(self, model: torch.nn.Module, step: int | None = None, *, lr: float | None = None,
               optimizer: Any = None, **extra: Any) -> SharpnessRecord:
        """Compute λ_max now, warm-started from the last Ritz vectors; append and return the record.

        ``optimizer`` (or ``lr``, else the tracker's ``lr``) gives the record's stability ``threshold``
        (:func:`fasthess.threshold.stability_threshold`); ``extra`` key/values go to the record's ``extra`` (their
        names must differ from the record's fields).
        """
        t0 = time.perf_counter()
        check_extra(extra)
        if optimizer is not None and lr is not None and optimizer.param_groups \
                and float(optimizer.param_groups[0]["lr"]) != float(lr):
            raise FasthessError(f"update got lr={lr} and an optimizer whose lr is {optimizer.param_groups[0]['lr']}; "
                                "the record's threshold comes from the optimizer, so pass one of them")
        previous = self._vectors
        v0 = previous if self.warm_start else None
        out, grad = self._explore_and_certify(model, v0, gradient=self.geometry)
        res = out.result
        same_shape = previous is not None and previous.shape[0] == res.eigenvectors.shape[0]
        warm = self.warm_start and same_shape
        self._vectors = res.ritz_vectors.detach().to("cpu", torch.float64).clone()
        if optimizer is not None and lr is None and optimizer.param_groups:
            lr = float(optimizer.param_groups[0]["lr"])
        lr = self.lr if lr is None else lr
        geometry = _geometry(res.eigenvectors, grad, previous if same_shape else None)
        rec = _record(out, step=step, previous=self.latest, lr=lr, rule=stability_threshold(optimizer, lr),
                      warm=warm, geometry=geometry, extra=extra)
        self.history.append(rec)
        for log in self.loggers:
            log(rec)
        self._last_cost = time.perf_counter() - t0
        self._spent += self._last_cost
        if _progress.wanted(self.progress):
            _progress.write(_update_line(rec, self.tol, self.time_share))
        return rec

    @property
    def time_share(self) -> float:
        """Seconds spent in :meth:`update` over the wall time since the tracker was built."""
        return self._spent / max(time.perf_counter() - self._born, 1e-12)

    # ------------------------------------------------------------------ access
    @property
    def latest(self) -> SharpnessRecord | None:
        """The last record, or None before the first update."""
        return self.history[-1] if self.history else None

    @property
    def lambda_max(self) -> float:
        """The last record's λ_max, or NaN before the first update."""
        return self.history[-1].lambda_max if self.history else math.nan

    @property
    def eigenvectors(self) -> torch.Tensor | None:
        """The top k eigenvectors of the last update (n, k), float64 on the CPU, as ``EigResult.eigenvectors``."""
        return None if self._vectors is None else self._vectors[:, : self.k]

    @property
    def ritz_vectors(self) -> torch.Tensor | None:
        """The top k + 1 Ritz vectors of the last update (n, k + 1; up to two more columns when they are tied with the
        (k+1)-th), float64 on the CPU, as ``EigResult.ritz_vectors``: the eigenvectors and their neighbour, the next
        warm start (with ``warm_start=True``), to which :func:`fasthess.eigs` adds a fresh random column. The
        neighbour makes a swap of the top two exact: with the eigenvectors alone the random column had to find the
        new top, and missed it at a 2 % gap (tests/test_certificate.py)."""
        return self._vectors

    def reset(self) -> None:
        """Forget the warm start (e.g. after the model's shape changes); history is kept."""
        self._vectors = None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """History (as plain dicts, :meth:`fasthess.SharpnessRecord.to_dict`, so ``torch.load(weights_only=True)``
        reads it) and warm-start vectors, for ``torch.save`` with the rest of a checkpoint."""
        return {"history": [r.to_dict() for r in self.history],
                "vectors": None if self._vectors is None else self._vectors.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s history and vectors; dict histories saved by older versions load too."""
        v = state.get("vectors")
        if v is not None and (not isinstance(v, torch.Tensor) or v.dim() != 2 or not bool(torch.isfinite(v).all())):
            raise FasthessError("the state's warm-start vectors are not a finite (n, j) tensor (a corrupted "
                                "checkpoint?); load the history without them, or call tracker.reset() after loading")
        self.history = [SharpnessRecord.from_dict(r) for r in state.get("history", [])]
        self._vectors = None if v is None else v.detach().to("cpu", torch.float64).clone()

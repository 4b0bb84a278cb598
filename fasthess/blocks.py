"""Certified top eigenvalues of every diagonal block of the Hessian, solved in lockstep with the full Hessian.

Split θ into blocks θ_b (by default one per module that owns parameters). The diagonal block H_bb = ∂²L/∂θ_b²
is the Hessian of the loss in θ_b with the other parameters fixed, and for a vector v_b of θ_b,

    H_bb v_b = [H E_b v_b]_b,

where E_b embeds v_b into the full parameter vector (zeros outside block b) and [·]_b keeps block b's rows.
So one product of the full Hessian H per column serves any block. :func:`block_lambda_max` runs one block
Lanczos solve (:func:`fasthess.lanczos.lanczos_steps`) per block plus one on H itself, and answers all of them
together: each round, every live solve's block of vectors is embedded, the columns are concatenated into one
matrix V and ``HessianOperator.matmat(V)`` is called once, so the round is one data pass with one forward and
one kept gradient graph per chunk for all blocks. Each solve gets the rows of its own block from its own
columns. Every solve keeps the certificate rules of :func:`fasthess.eigs` (Cauchy interlacing also gives
λ_max(H_bb) ≤ λ_max(H), a check the tests use).
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Generator, Mapping, Sequence

import torch
from torch import nn

from fasthess.errors import FasthessError
from fasthess.hessian import HessianOperator
from fasthess.lanczos import Outcome, check_options, default_block_size, lanczos_steps
from fasthess.linop import fixed
from fasthess.results import EigResult

FULL = "full"
#: options of :func:`fasthess.eigs` that every block solve shares (``v0`` has no meaning across blocks)
SOLVER_OPTIONS = ("block_size", "max_iters", "seed", "progress", "max_basis")
#: keyword arguments of :class:`HessianOperator` besides ``batch_size`` (``params`` is what ``blocks`` sets)
OPERATOR_OPTIONS = tuple(name for name, p in inspect.signature(HessianOperator.__init__).parameters.items()
                         if p.kind is p.KEYWORD_ONLY and name not in ("batch_size", "params"))


def module_blocks(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """One block per module that owns trainable parameters directly, named by its module path ("" is the root);
    a parameter shared by several modules belongs to the first (the order of ``model.named_parameters()``)."""
    blocks: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            blocks.setdefault(name.rpartition(".")[0], []).append(p)
    if not blocks:
        raise FasthessError("the model has no trainable parameters (all have requires_grad=False); unfreeze some, "
                            "or pass blocks={name: [parameters]}")
    return blocks


def _checked_blocks(blocks: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    if not isinstance(blocks, Mapping) or not blocks:
        raise FasthessError(f"blocks must be a non-empty mapping from a block name to a list of parameters, got "
                            f"{type(blocks).__name__}; or None for one block per module")
    out = {}
    for name, params in blocks.items():
        if not isinstance(name, str) or name == FULL:
            raise FasthessError(f"block name {name!r} must be a string other than {FULL!r} (the key of the full "
                                "Hessian's result); rename the block")
        if isinstance(params, torch.Tensor) or not isinstance(params, Sequence) or not params:
            raise FasthessError(f"block {name!r} must be a non-empty list of parameters, e.g. "
                                "list(model.fc.parameters()); a single tensor goes in a list: [p]")
        if len({id(p) for p in params}) != len(params):
            raise FasthessError(f"block {name!r} lists a parameter twice; list each parameter once")
        out[name] = list(params)
    return out


def _split_options(options: dict) -> tuple[dict, dict]:
    """(operator options, solver options); anything else is refused by name."""
    if "params" in options:
        raise FasthessError("block_lambda_max takes no params=; pass the parameters as blocks={name: [parameters]}")
    unknown = sorted(set(options) - set(OPERATOR_OPTIONS) - set(SOLVER_OPTIONS))
    if unknown:
        raise FasthessError(f"block_lambda_max got unsupported option(s) {unknown}; it takes the operator options "
                            f"{list(OPERATOR_OPTIONS)} and the solver options {list(SOLVER_OPTIONS)} (v0 and which do "
                            "not apply: each block starts at random and wants its largest eigenvalues)")
    return ({k: v for k, v in options.items() if k in OPERATOR_OPTIONS},
            {k: v for k, v in options.items() if k in SOLVER_OPTIONS})


def _layout_indices(op: HessianOperator, params: list[torch.Tensor]) -> torch.Tensor:
    """Positions of ``params`` in the operator's flat parameter vector."""
    offsets, off = {}, 0
    for p, numel in zip(op.params, op.numels):
        offsets[id(p)] = (off, numel)
        off += numel
    return torch.cat([torch.arange(o, o + m) for o, m in (offsets[id(p)] for p in params)]).to(op.device)


class _Solve:
    """One block's Lanczos generator, its rows of the full vector and its counters."""

    def __init__(self, index: torch.Tensor, steps: Generator[torch.Tensor, torch.Tensor, Outcome]) -> None:
        self.index, self.steps = index, steps
        self.block = next(steps)  # runs the generator's own checks, before any product
        self.num_hvps = self.num_passes = 0
        self.result: EigResult | None = None

    def answer(self, W: torch.Tensor, seconds: float) -> None:
        self.num_hvps += W.shape[0]
        self.num_passes += 1
        try:
            self.block = self.steps.send(W)
        except StopIteration as stop:
            self.result = stop.value.result(self.num_hvps, self.num_passes, seconds)


def _lockstep(op, solves: dict[str, _Solve]) -> dict[str, EigResult]:
    """Answer every live solve's block from one ``op.matmat`` per round until all have returned."""
    t0 = time.perf_counter()
    with fixed(op):
        while live := [s for s in solves.values() if s.result is None]:
            widths = [s.block.shape[0] for s in live]
            columns = torch.arange(sum(widths), device=op.device).split(widths)
            V = torch.zeros(op.num_params, sum(widths), dtype=torch.float64, device=op.device)
            for s, cols in zip(live, columns):
                V[s.index[:, None], cols] = s.block.T
            HV = op.matmat(V)
            for s, cols in zip(live, columns):
                s.answer(HV[s.index[:, None], cols].T, time.perf_counter() - t0)
    return {name: s.result for name, s in solves.items()}


def block_lambda_max(model: nn.Module, loss_fn: Callable, data, *, blocks: Mapping[str, Sequence[torch.Tensor]]
                     | None = None, batch_size: int | None = None, k: int = 1, tol: float = 1e-4,
                     **options) -> dict[str, EigResult]:
    """Certified top-k eigenvalues of every diagonal block H_bb of the Hessian and of H itself (module docstring).

    Args:
        blocks: ``{name: [parameters]}``; None makes one block per module that owns trainable parameters
            (:func:`module_blocks`). The full Hessian is that of all the blocks' parameters together.
        k, tol: as :func:`fasthess.eigs` (``which="LA"``), for every block and for the full Hessian.
        options: :class:`HessianOperator` options (``allow_stochastic``, ``hvp``, ``graph_memory``, ``batch``,
            ``penalty``, ``distributed``, ``process_group``) and :func:`fasthess.eigs` options (``block_size``,
            ``max_iters``, ``seed``, ``progress``, ``max_basis``), shared by every solve.

    Returns:
        ``{name: EigResult}`` for each block, in the order of ``blocks``, and the full Hessian's under ``"full"``.
        A result's ``num_hvps`` counts its own columns and ``num_passes`` the rounds it took part in; every round
        is one data pass shared by all the solves still running, so the data passes of the whole call are the
        largest ``num_passes``, and ``seconds`` is the time from the first round to the end of the solve's last.
    """
    op_options, solver = _split_options(options)
    check_options(k, "LA", tol, solver.get("block_size"), solver.get("max_iters"), solver.get("max_basis"))
    chosen = module_blocks(model) if blocks is None else _checked_blocks(blocks)
    union = list({id(p): p for params in chosen.values() for p in params}.values())
    op = HessianOperator(model, loss_fn, data, batch_size=batch_size, params=union, **op_options)
    # The one operator over the union of the blocks is what shares the pass: B operators with params= each block
    # would each run their own forward, gradient graph and data pass per round.
    indices = {name: _layout_indices(op, params) for name, params in chosen.items()}
    indices[FULL] = torch.arange(op.num_params, device=op.device)
    for name, index in indices.items():
        if index.numel() <= k:
            raise FasthessError(f"block {name!r} has {index.numel()} parameter(s), not more than k = {k}, so its top-k "
                                "eigenvalues are all of them and no Krylov certificate applies; merge it into another "
                                "block with blocks={name: [parameters]}, or lower k")
    block_size = solver.pop("block_size", None)
    width = block_size or default_block_size(k, op.device, model_operator=True)
    solves = {name: _Solve(index, lanczos_steps(index.numel(), op.device, op.dtype, k=k, which="LA", tol=tol,
                                                block_size=width, requested_block=block_size, **solver))
              for name, index in indices.items()}
    return _lockstep(op, solves)

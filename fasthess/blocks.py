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

With double-backward products (the CPU default) a column of block b is differentiated only from block b's
gradients to block b's parameters, H_bb v_b = ∂(g_b · v_b)/∂θ_b, so autograd runs only the part of the kept graph
between them (:class:`BlockDiagonalHessian`): the embedded product of the whole H costs one full second backward
per column, which made a lockstep of the benchmark CNN's 4 blocks and H 2.1 times as slow as 5 separate solves
(benchmarks/bench_blocks.py, 2 loaded cores). With forward-over-reverse products (accelerators) the b tangents
share one vmapped pass and the embedded product is used.

The same holds for the generalized Gauss-Newton matrix G = Jᵀ (∇²_o ℓ) J (``curvature="ggn"``,
:class:`fasthess.ggn.GGNOperator`): with J_b = ∂o/∂θ_b, block b's rows of G E_b v_b are J_bᵀ (∇²_o ℓ) J_b v_b
= G_bb v_b, so the embedded product serves every block, and the GGN's vmapped columns share one pass per chunk.
"""
from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence

import torch
from torch import nn

from fasthess._data import Chunk
from fasthess._graph_cache import ChunkGraph
from fasthess._model_operator import PassState
from fasthess.errors import FasthessError
from fasthess.ggn import GGNOperator
from fasthess.hessian import HessianOperator
from fasthess.lanczos import (Outcome, check_options, check_span, default_block_size, lanczos_steps,
                               precision_checked, products_dtype)
from fasthess.linop import fixed
from fasthess.results import EigResult

FULL = "full"
CURVATURES = ("hessian", "ggn")
#: options of :class:`HessianOperator` that choose how its products are formed, which the GGN does not take
HESSIAN_ONLY = ("hvp", "graph_memory")
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


def _layout(op: HessianOperator, params: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """The positions of ``params`` among the operator's parameter tensors, and their entries' positions in its flat
    parameter vector."""
    order = {id(p): i for i, p in enumerate(op.params)}
    starts = [0, *torch.tensor(op.numels).cumsum(0).tolist()]
    support = [order[id(p)] for p in params]
    index = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in support]).to(op.device)
    return support, index


def _block_products(graph: ChunkGraph, tangents: list[torch.Tensor], keep: bool,
                    supports: list[list[int]]) -> list[torch.Tensor]:
    """Column j of ``tangents`` (one (b, *shape) tensor per parameter) times the diagonal block of ∇²value on the
    parameters ``supports[j]``: ∂(g_s · v_s)/∂θ_s, zeros outside s; one backward over the graph between g_s and θ_s."""
    hv = [torch.zeros_like(t) for t in tangents]
    live = set(graph.live)
    with torch.enable_grad():
        for j, support in enumerate(supports):
            outputs = [i for i in support if i in live]
            if not outputs:
                continue
            cols = torch.autograd.grad([graph.grads[i] for i in outputs], [graph.leaves[i] for i in support],
                                       [tangents[i][j] for i in outputs], retain_graph=keep or j + 1 < len(supports),
                                       allow_unused=True)
            for i, c in zip(support, cols):
                if c is not None:
                    hv[i][j] = c
    return hv


class BlockDiagonalHessian(HessianOperator):
    """The Hessian operator with one more product, :meth:`block_matmat`: each column times its own diagonal block."""

    _supports: list[list[int]] | None = None

    def block_matmat(self, V: torch.Tensor, supports: list[list[int]]) -> torch.Tensor:
        """H_{s_j s_j} V[:, j] in the rows of s_j for each column j, with s_j = ``supports[j]`` (indices into
        :attr:`params`); V must be zero outside each column's block. The other rows are not part of the result
        (zero with double backward, the off-diagonal blocks' products otherwise). One data pass, like :meth:`matmat`."""
        self._supports = supports
        try:
            return self.matmat(V)
        finally:
            self._supports = None

    def _chunk_products(self, chunk: Chunk, state: PassState):
        if self._supports is None or self.hvp_method != "double-backward":
            return super()._chunk_products(chunk, state)  # the full product has the block's rows too
        graph, keep = self._chunk_graph(chunk, state.graphs)
        return _block_products(graph, state.tangents, keep, self._supports), graph.loss


class _Solve:
    """One block's Lanczos generator, its parameter tensors and entries in the operator's layout, its counters."""

    def __init__(self, layout: tuple[list[int], torch.Tensor],
                 steps: Generator[torch.Tensor, torch.Tensor, Outcome]) -> None:
        (self.support, self.index), self.steps = layout, steps
        self.block = next(steps)  # runs the generator's own checks, before any product
        self.num_hvps = self.num_passes = 0
        self.seconds = 0.0
        self.outcome: Outcome | None = None

    def answer(self, W: torch.Tensor, seconds: float) -> None:
        self.num_hvps += W.shape[0]
        self.num_passes += 1
        try:
            self.block = self.steps.send(W)
        except StopIteration as stop:
            self.outcome, self.seconds = stop.value, seconds


class _CheckedImages:
    """One block's float64 products of its check rows (:func:`fasthess.lanczos.check_span`), all blocks' computed
    in one data pass (:func:`_float64_images`), served to :func:`fasthess.lanczos.precision_checked` as the float64
    twin of the block's operator (or the failure of that pass, raised as the twin's would be)."""

    def __init__(self, images: torch.Tensor | Exception) -> None:
        self.images, self.num_hvps = images, 0

    def in_float64(self) -> _CheckedImages:
        return self

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        yield

    def matmat(self, X: torch.Tensor) -> torch.Tensor:
        """H_bb X (n_b, j) for X the block's check rows, transposed."""
        if isinstance(self.images, Exception):
            raise self.images
        if self.images.shape != X.shape:
            raise RuntimeError(f"the float64 images are {tuple(self.images.shape)}, not {tuple(X.shape)}")
        self.num_hvps += X.shape[1]
        return self.images


def _float64_images(op: HessianOperator | GGNOperator, solves: dict[str, _Solve]) -> dict[str, _CheckedImages]:
    """Every block's check rows multiplied by the float64 twin of ``op`` in one data pass (a separate pass per block
    would cost a full float64 pass each)."""
    spans = {name: check_span(s.outcome) for name, s in solves.items()}
    widths = [span.shape[0] for span in spans.values()]
    columns = dict(zip(spans, torch.arange(sum(widths), device=op.device).split(widths)))
    V = torch.zeros(op.num_params, sum(widths), dtype=torch.float64, device=op.device)
    for name, s in solves.items():
        V[s.index[:, None], columns[name]] = spans[name].T.to(V.device)
    twin = op.in_float64()
    try:
        with fixed(twin):
            HV = _product_of(twin)(V, [solves[name].support for name in spans for _ in columns[name]])
    except FasthessError:
        raise
    except Exception as exc:  # noqa: BLE001 - each block's check reports it, as eigs' check does
        return {name: _CheckedImages(exc) for name in solves}
    return {name: _CheckedImages(HV[s.index[:, None], columns[name]]) for name, s in solves.items()}


#: ``product(V, supports)``: the operator's columns V[:, j] in the rows of the parameter tensors ``supports[j]``
BlockProduct = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]


def _block_operator(curvature: str, model: nn.Module, loss_fn: Callable, data, batch_size: int | None,
                    params: list[torch.Tensor], options: dict) -> tuple[HessianOperator | GGNOperator, BlockProduct]:
    """The operator of ``curvature`` over ``params`` and its product of block-restricted columns."""
    if curvature not in CURVATURES:
        raise FasthessError(f"curvature={curvature!r} must be one of {CURVATURES}")
    if curvature == "hessian":
        op = BlockDiagonalHessian(model, loss_fn, data, batch_size=batch_size, params=params, **options)
        return op, _product_of(op)
    given = sorted(set(options) & set(HESSIAN_ONLY))
    if given:
        raise FasthessError(f"{given} choose how Hessian-vector products are formed and do not apply to "
                            "curvature='ggn'; leave them out")
    ggn = GGNOperator(model, loss_fn, data, batch_size=batch_size, params=params, **options)
    return ggn, _product_of(ggn)


def _product_of(op: HessianOperator | GGNOperator) -> BlockProduct:
    """The product of block-restricted columns: :meth:`BlockDiagonalHessian.block_matmat`, or the GGN's ordinary
    product (block b's rows of G E_b v_b are G_bb v_b, module docstring)."""
    return op.block_matmat if isinstance(op, BlockDiagonalHessian) else (lambda V, supports: op.matmat(V))


def _lockstep(op: HessianOperator | GGNOperator, product: BlockProduct,
              solves: dict[str, _Solve]) -> dict[str, EigResult]:
    """Answer every live solve's block from one ``product`` per round until all have returned; then each result,
    its bounds checked against float64 products where the products' precision asks for it."""
    t0 = time.perf_counter()
    with fixed(op):
        while live := [s for s in solves.values() if s.outcome is None]:
            widths = [s.block.shape[0] for s in live]
            columns = torch.arange(sum(widths), device=op.device).split(widths)
            V = torch.zeros(op.num_params, sum(widths), dtype=torch.float64, device=op.device)
            for s, cols in zip(live, columns):
                V[s.index[:, None], cols] = s.block.T
            HV = product(V, [s.support for s, w in zip(live, widths) for _ in range(w)])
            for s, cols in zip(live, columns):
                s.answer(HV[s.index[:, None], cols].T, time.perf_counter() - t0)
    dtype = products_dtype(op)
    twins = _float64_images(op, solves) if dtype != torch.float64 else {}
    return {name: precision_checked(twins.get(name), s.outcome, dtype).result(
        s.num_hvps, s.num_passes, s.seconds, getattr(op, "contract", None)) for name, s in solves.items()}


def block_lambda_max(model: nn.Module, loss_fn: Callable, data, *, blocks: Mapping[str, Sequence[torch.Tensor]]
                     | None = None, batch_size: int | None = None, k: int = 1, tol: float = 1e-4, full: bool = True,
                     curvature: str = "hessian", **options) -> dict[str, EigResult]:
    """Certified top-k eigenvalues of every diagonal block H_bb of the Hessian and of H itself (module docstring).

    Args:
        blocks: ``{name: [parameters]}``; None makes one block per module that owns trainable parameters
            (:func:`module_blocks`). The full Hessian is that of all the blocks' parameters together.
        k, tol: as :func:`fasthess.eigs` (``which="LA"``), for every block and for the full Hessian.
        full: solve the full Hessian too, in the same lockstep (its products cost a whole second backward each).
        curvature: ``"hessian"`` or ``"ggn"`` (the blocks G_bb of the generalized Gauss-Newton matrix, and G;
            ``hvp`` and ``graph_memory`` do not apply).
        options: :class:`HessianOperator` options (``allow_stochastic``, ``hvp``, ``graph_memory``, ``batch``,
            ``penalty``, ``distributed``, ``process_group``) and :func:`fasthess.eigs` options (``block_size``,
            ``max_iters``, ``seed``, ``progress``, ``max_basis``), shared by every solve.

    Returns:
        ``{name: EigResult}`` for each block, in the order of ``blocks``, and the full Hessian's under ``"full"``
        (unless ``full=False``).
        A result's ``num_hvps`` counts its own columns and ``num_passes`` the rounds it took part in; every round
        is one data pass shared by all the solves still running, so the data passes of the whole call are the
        largest ``num_passes``, and ``seconds`` is the time from the first round to the end of the solve's last.
    """
    op_options, solver = _split_options(options)
    check_options(k, "LA", tol, solver.get("block_size"), solver.get("max_iters"), solver.get("max_basis"))
    chosen = module_blocks(model) if blocks is None else _checked_blocks(blocks)
    union = list({id(p): p for params in chosen.values() for p in params}.values())
    op, product = _block_operator(curvature, model, loss_fn, data, batch_size, union, op_options)
    # The one operator over the union of the blocks is what shares the pass: B operators with params= each block
    # would each run their own forward, gradient graph and data pass per round.
    layouts = {name: _layout(op, params) for name, params in chosen.items()}
    if full:
        layouts[FULL] = _layout(op, op.params)
    for name, (_, index) in layouts.items():
        if index.numel() <= k:
            raise FasthessError(f"block {name!r} has {index.numel()} parameter(s), not more than k = {k}, so its top-k "
                                "eigenvalues are all of them and no Krylov certificate applies; merge it into another "
                                "block with blocks={name: [parameters]}, or lower k")
    block_size = solver.pop("block_size", None)
    width = block_size or default_block_size(k, op)
    solves = {name: _Solve(layout, lanczos_steps(layout[1].numel(), op.device, products_dtype(op), k=k, which="LA",
                                                 tol=tol, block_size=width, requested_block=block_size, **solver))
              for name, layout in layouts.items()}
    return _lockstep(op, product, solves)

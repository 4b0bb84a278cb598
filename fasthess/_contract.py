"""The loss contract, checked on the first pass of a model operator.

On the first chunk: the data is finite, the forward runs (no reentrant checkpointing), the loss takes the output,
has a second derivative, reads θ only through the output (a penalty only through its argument), the model's outputs
split over the examples (:mod:`fasthess._model_split`) and the loss splits over them as a mean, a sum or
per-example losses (:mod:`fasthess._criteria`); a first chunk of one row has its model split judged joined with the
second chunk (or on the second alone when the two cannot be joined). On the other chunks of the first pass, the
model split is judged again at θ on a few sub-batches of each (mixing set off by what those chunks hold), and a
loss callable is tested again on the first chunk joined with each (a normalizer that depends on the batch). A
refusal caused by random draws is reported as such: :class:`GeneratorWatch` is the one comparison of the default
generators.

What the first pass carries from chunk to chunk is a :class:`FirstPass`, passed explicitly.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from fasthess._batch import (Batch, cast_floating, halfway, join_rows, nonfinite_data, take_output_rows, take_rows,
                             tensors_of)
from fasthess._buffers import buffer_versions, refuse_stateful_forward, written_buffers
from fasthess._data import Chunk
from fasthess._examples import ITEMS, Split, roundoff, worst_row_gap
from fasthess._model_split import FORWARD_ERRORS, check_model_splits, example_layout
from fasthess._unsupported import refuse_reentrant_checkpoint, refuse_without_second_derivative, translated_errors
from fasthess.errors import (BatchDependentModelError, FasthessError, LossContractError, NonFiniteError,
                             StatefulModelError, StochasticModelError, UnsupportedModelError)

__all__ = ["CONTRACT_BASES", "ContractChecks", "FirstPass", "GeneratorWatch", "later_chunk_failure", "random_draws"]


class GeneratorWatch:
    """The default random generators (CPU, and the device's on CUDA) as they were when this was made; a random
    draw since then shows in :meth:`advanced`. The one generator comparison of the operators."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.states = device, self._states(device)

    @staticmethod
    def _states(device: torch.device) -> list[torch.Tensor]:
        states = [torch.random.get_rng_state()]
        if device.type == "cuda":
            states.append(torch.cuda.get_rng_state(device))
        return states

    def advanced(self) -> bool:
        """Did some default generator draw since this was made?"""
        return not all(torch.equal(a, b) for a, b in zip(self.states, self._states(self.device)))


@contextlib.contextmanager
def checking_forward() -> Iterator[None]:
    """The mode of the checks' forwards: grad enabled, as in the products (a forward may branch on
    ``torch.is_grad_enabled()`` or call ``torch.autograd.grad`` on its input), with detached parameters so that
    no graph to them is built, and the math attention kernel, which has a second derivative."""
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        yield


def detached(tree):
    """``tree`` with every tensor detached (a check's forward builds a graph when the forward differentiates its
    input; the checks compare values only)."""
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _moves(t: torch.Tensor) -> list[torch.Tensor]:
    """Copies of a leaf moved far enough in both directions to cross any threshold a loss may compare it with."""
    t = t.detach()
    if t.dtype == torch.bool:
        return [~t]
    if not (t.is_floating_point() or t.is_complex()):
        return [t + 1, t - 1000, t + 1000]
    return [t * 1.1 + 0.1, t + 1e3 * (t.abs() + 1), t - 1e3 * (t.abs() + 1)]


def _leaves_read(value, probe, loss_of: Callable[[object], object]) -> list[int]:
    """The numbers of the tensor leaves of ``probe`` (the output; floating leaves require grad) that the loss
    ``value = loss_of(probe)`` reads: through its graph, or (a ``.detach()``, an ``.item()``, a comparison, an
    integer or boolean leaf) because its value changes when the leaf is moved (:func:`_moves`)."""
    leaves, spec = pytree.tree_flatten(probe)
    tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    if not (isinstance(value, torch.Tensor) and tensors):
        return []
    read = []
    graphed = [i for i in tensors if leaves[i].requires_grad]
    if value.requires_grad and graphed:
        grads = torch.autograd.grad(value.sum(), [leaves[i] for i in graphed], allow_unused=True, retain_graph=True)
        read = [i for i, g in zip(graphed, grads) if g is not None]
    with torch.no_grad():
        for i in (i for i in tensors if i not in read):
            for moved in _moves(leaves[i]):
                try:
                    other = loss_of(pytree.tree_unflatten(leaves[:i] + [moved] + leaves[i + 1:], spec))
                except (RuntimeError, ValueError, TypeError, IndexError):
                    continue
                if not (isinstance(other, torch.Tensor) and torch.equal(other.detach(), value.detach())):
                    read.append(i)
                    break
    return sorted(read)


def _finite(value) -> bool:
    """Every element of a tensor loss value is finite (non-tensors count as finite)."""
    return not isinstance(value, torch.Tensor) or bool(torch.isfinite(value).all())


def _same(a, b) -> bool:
    """Two loss values (scalars or per-example tensors) agree to float64 roundoff of the loss's dtype."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return False
    rtol = 1e-10 if a.dtype == torch.float64 else 1e-5
    return bool(torch.allclose(a.double(), b.double(), rtol=rtol, atol=0.0))


def random_draws(what: str, training: bool) -> str:
    """The refusal of a random forward, with the fix that fits the model's mode."""
    fix = ("the model is in train mode, so this is most likely dropout that is not an nn.Dropout module (e.g. "
           "Hugging Face attention dropout, F.dropout(training=self.training)): call model.eval()"
           if training else "remove the randomness (e.g. label noise, torch.randn_like)")
    return (f"{what}, so the Hessian is not a fixed matrix; {fix}, or pass allow_stochastic=True to accept a "
            "random operator (each chunk then shares one draw across the block)")


def scalar_value(value, penalty: bool = False) -> torch.Tensor:
    """``value`` checked to be a 0-dim tensor (the loss's chunk sum, or the ``penalty``'s value)."""
    if not isinstance(value, torch.Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        fix = ("the penalty must return a scalar, e.g. lambda params: 1e-4 * sum(p.pow(2).sum() for p in "
               "params.values())" if penalty else "return a scalar (a mean or sum over the batch) or "
               "per-example losses of shape (rows,)")
        raise FasthessError(f"the {'penalty' if penalty else 'loss'} gave {shape}, not a scalar tensor; {fix}")
    return value


@dataclass
class FirstPass:
    """What the first pass carries from chunk to chunk: whether the first chunk was checked, its ``(output, chunk,
    fits)`` when a loss callable's joined-chunk tests need them (``fits``: the output leaves' example dimensions
    found by the split check, or None), and this process's part of W so far."""

    checked: bool = False
    index: int = -1  # the first chunk's index and examples
    rows: int = 0
    kept: tuple | None = None
    basis: str | None = None  # what the operator's equality with the whole-data Hessian rests on (CONTRACT_BASES)
    total: torch.Tensor | None = None
    lone: Chunk | None = None  # a first chunk of one row: its forward's split is judged joined with the next chunk
    unjudged: list[int] = field(default_factory=list)  # later chunks of two or more rows whose split nothing showed

    @property
    def contract(self) -> str | None:
        """The basis, with the later chunks whose split could not be judged named."""
        if not self.unjudged or self.basis is None:
            return self.basis
        listed = ", ".join(map(str, self.unjudged[:5])) + (", ..." if len(self.unjudged) > 5 else "")
        return (f"{self.basis}; except chunks {listed}, where the forward ran on no sub-batch, so their split was "
                "assumed")


#: what the operator's equality with the Hessian of the loss on the whole data rests on, by case
#: (:attr:`fasthess.EigResult.contract`)
CONTRACT_BASES = {
    "checked": "checked: the forward's outputs split over the examples of each chunk",
    "ghost": "checked: the forward's outputs split over the examples of each chunk, train-mode BatchNorm "
             "normalizing each chunk by its own statistics (ghost batches)",
    "one chunk": "one chunk: the loss on the whole data as one batch",
    "declared": "declared: BatchSpec(batch_loss=True), each chunk's loss as given",
    "random": "assumed: a random forward (allow_stochastic=True), whose split over the examples is not checked",
    "unjudged": "assumed: nothing showed where the examples are in the inputs, or the forward ran on no sub-batch, "
                "so its split over the examples was not checked",
}


def later_chunk_failure(chunk: Chunk, first_rows: int, exc: Exception) -> FasthessError:
    """The error for a forward (or its products) that ran on the first chunk and fails on a later one: the chunk,
    its size against the first's, and what failed."""
    rows = chunk.batch.rows
    size = (f"; it has {rows} examples and the first had {first_rows}: a forward that takes only some batch sizes "
            "(a view or reshape to a fixed batch size, x.view(64, -1)) fails on a shorter last chunk. Make it take "
            "any batch size (x.view(len(x), -1)), or choose batch_size so that every chunk has the same size"
            if rows != first_rows else "; check that chunk's data (an index out of range, a shape that differs)")
    return FasthessError(f"the model's forward or its products failed on chunk {chunk.index} after running on the "
                         f"first ({type(exc).__name__}: {str(exc)[:200]}){size}")


def _reading(accepted: list[Split | None]) -> str:
    """The basis's qualifier when the inputs hold examples along either of two dimensions and the outputs split
    along one only (a sequence-first model: (T, N) or (N, T) inputs look alike): the answer rests on that
    reading."""
    split = next((s for s in accepted if s is not None and s.mixing is not None), None)
    if split is None:
        return ""
    return (f", reading the examples along the inputs' dimension {split.cut.axis}; along dimension "
            f"{split.mixing.axis} the outputs mix, so if the examples are there (check batch_first), the answer is "
            "the Hessian of the chunks' sum, not of the whole data")


#: the relative size of the second point at which the forward's split is judged
PERTURBATION = 0.1


def perturbed(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """θ + δ·(rms(θₜ) + 1)·ξ per tensor (δ = PERTURBATION, ξ standard normal from a private generator: the caller's
    random state is untouched). The split is judged here as well as at θ because mixing behind a gate that is zero
    (or tiny) at θ leaves the outputs per-example there while the Hessian's gate rows mix the examples."""
    gen = torch.Generator(device=params[0].device if params else "cpu").manual_seed(0)
    return [p + PERTURBATION * (p.pow(2).mean().sqrt() + 1) * torch.randn(p.shape, generator=gen, device=p.device,
                                                                          dtype=p.dtype)
            if p.is_floating_point() and p.numel() else p for p in params]


class ContractChecks:
    """The first-pass checks of :class:`fasthess._model_operator.ModelOperator`, which provides ``model``,
    ``loss``, ``loss_fn``, ``penalty``, ``data``, ``comm``, ``names``, ``device``, ``compute_dtype``,
    ``allow_stochastic``, ``_params``, ``_primals()``, ``_forward(params, batch)`` and ``modes``
    (:class:`fasthess._modes.ModeRules`)."""

    def _check_first_pass(self, chunk: Chunk, first: FirstPass) -> None:
        """First pass, before chunk ``chunk``'s products: the contract on the first chunk; on the others, the model
        split judged again at θ on a few sub-batches (when the first chunk's was judged; :mod:`fasthess._model_split`)
        and the joined-chunk test (a loss callable); and this chunk's part of W."""
        if not first.checked:
            (first.kept, first.basis, first.read), first.checked = self._check_contract(chunk), True
            first.index, first.rows = chunk.index, chunk.batch.rows
            if chunk.batch.rows < 2 and not self.data.spec.batch_loss:
                first.lone = chunk
        else:
            judge = first.lone is None and first.basis.startswith("checked")
            if first.lone is not None:
                lone, first.lone = first.lone, None
                first.basis = self._check_joined_splits(lone, chunk, first.read)
            out = self._later_output(chunk, first.rows) if judge or first.kept is not None else None
            if judge and nonfinite_data(chunk.batch) is None and chunk.batch.rows > 1:
                # (non-finite rows would look like mixing: the pass's own check names them)
                split, _ = self._check_model_splits(chunk.batch, out, f"chunk {chunk.index}", first.read,
                                                    thorough=False)
                if split is None:
                    first.unjudged.append(chunk.index)
            if first.kept is not None:
                self._check_joined(chunk, first.kept, out)
        if not self.loss.sums:
            part = self.loss.normalizer(chunk.batch).to(self.device)
            first.total = part if first.total is None else first.total + part

    def _check_contract(self, chunk: Chunk) -> tuple[tuple | None, str, list[int] | None]:
        """Once, on the first chunk: the loss reads θ only through the output, and splits over the examples; a
        refusal caused by random draws (in the forward or the loss) is reported as such. Returns (output, chunk,
        fits) for a loss callable's joined-chunk tests, else None; the basis (:data:`CONTRACT_BASES`); and the
        output leaves the loss reads (None: all)."""
        watch = GeneratorWatch(self.device)
        try:
            kept = self._check_chunk(chunk)
        except LossContractError as exc:
            self._refuse_random(watch, exc)
            raise
        self._refuse_random(watch, None)
        return kept

    def _refuse_random(self, watch: GeneratorWatch, cause: Exception | None, where: str = "the first chunk") -> None:
        if self.allow_stochastic or not watch.advanced():
            return
        raise StochasticModelError(
            random_draws(f"the model's forward or the loss drew random numbers on {where}",
                         self.model.training)) from cause

    def _later_output(self, chunk: Chunk, first_rows: int):
        """The output on a later chunk of the first pass, for its checks (:meth:`_check_first_pass`), as a check runs
        the forward; a failure is named as the products would name it (:func:`later_chunk_failure`)."""
        watch = GeneratorWatch(self.device)
        try:
            with translated_errors():  # PyTorch's errors it knows come out named, as from the products
                out = self._checking_output(chunk.batch)
        except FasthessError:
            raise
        except FORWARD_ERRORS as exc:
            raise later_chunk_failure(chunk, first_rows, exc) from exc
        self._refuse_random(watch, None, f"chunk {chunk.index}")
        return out

    def _first_output(self, batch: Batch, buffers: dict[str, torch.Tensor] | None = None,
                      params: list[torch.Tensor] | None = None):
        """The model's output on the first chunk (:func:`checking_forward`; ``buffers`` by name replace the model's,
        ``params`` the parameters), refusing reentrant checkpointing and naming a failed call's likely cause."""
        with checking_forward(), refuse_reentrant_checkpoint():
            try:
                return detached(self._forward({**(buffers or {}), **self._checking_params(params or self._primals())},
                                              batch))
            except (TypeError, RuntimeError, ValueError, IndexError, KeyError, AttributeError) as exc:
                if "does not require grad" in str(exc):
                    raise UnsupportedModelError(
                        f"the model's forward differentiates with respect to the model's parameters ({str(exc)[:120]}):"
                        " an inner gradient step (MAML, test-time adaptation) inside the forward is not supported; "
                        "fasthess runs the forward with θ substituted as tensors that do not require grad, and an "
                        "inner step on the batch's own loss mixes the examples of the batch. Take the Hessian of the "
                        "adapted model: run the inner step first and pass a model holding the adapted weights") from exc
                raise FasthessError(
                    f"the model's forward failed on the first chunk ({type(exc).__name__}: {str(exc)[:200]}) when "
                    f"called with {len(batch.args)} positional input(s) and keyword inputs {sorted(batch.kwargs)}; "
                    "check that the inputs have the model's dtype and device, or say which parts of a batch are the "
                    "inputs with batch=fasthess.BatchSpec(inputs=...): e.g. BatchSpec(inputs=lambda b: (b,), "
                    "targets=lambda b: b['labels']) passes a dict batch whole as model(b)") from exc

    def _first_output_fixed(self, batch: Batch):
        """The first chunk's output, run on a copy of its inputs, refusing a forward that writes its input in place
        (each pass would see other data, and the caller's data would change) or a buffer it reads
        (:func:`fasthess._buffers.refuse_stateful_forward`)."""
        copy = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (batch.args, batch.kwargs))
        inputs = [(t, t._version) for t in tensors_of(copy)]
        versions = buffer_versions(self.model)
        params = [p.clone() for p in self._primals()]  # a forward that writes a parameter writes these copies
        written = [p._version for p in params]
        out = self._first_output(replace(batch, args=copy[0], kwargs=copy[1]), params=params)
        changed = [name for name, p, version in zip(self.names, params, written) if p._version != version]
        if changed:
            raise StatefulModelError(
                f"the model's forward changes the parameters {changed[:3]} in place (e.g. nn.Embedding(max_norm=...) "
                "renormalizes the rows it looks up); fasthess would take the Hessian at other weights than yours. "
                "Renormalize once before the curvature and build the model without the in-place write (e.g. "
                "max_norm=None), or write the normalization out of place in the forward")
        if any(t._version != version for t, version in inputs):
            raise StatefulModelError(
                "the model's forward changes its input in place (e.g. x.mul_(0.5), x += 1, x.clamp_()); fasthess "
                "runs the forward on the same data once per product, so each pass would see other data (and your "
                "data would change). Use out-of-place operations (x = x * 0.5), or copy first (x = x.clone())")
        written = written_buffers(self.model, versions)
        if written:  # a buffer filled once is not state if it is a cache grown to the data's length
            again = buffer_versions(self.model)
            self._first_output(batch)
            rewritten = written_buffers(self.model, again)
            initialized = sorted(n for n, b in written.items() if n not in rewritten
                                 and (b.shape, b.dtype) == (versions[n][0].shape, versions[n][0].dtype))
            if initialized:
                raise StatefulModelError(
                    f"the model's forward writes the buffer(s) {initialized[:3]} on its first call only: a "
                    "data-dependent initialization (ActNorm, a normalizer fitted on the first batch it sees), so "
                    "the Hessian would depend on which chunk came first. Initialize the model before fasthess (one "
                    "forward of your data, or set the buffers), so that it is a fixed function of the parameters")
            written = {n: b for n, b in written.items() if n in rewritten}
        refuse_stateful_forward(written, lambda buffers: self._first_output(batch, buffers), out, batch.rows)
        return out

    def _first_loss(self, out, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """The loss on the first chunk with a graph from the output (never from θ through the model), refusing ops
        without a second derivative, and the numbers of the output leaves it reads."""
        if self.loss.kind == "criterion":
            self.loss.check_shapes(out, batch.target)
        probe = pytree.tree_map(lambda t: t.detach().requires_grad_(True).clone() if isinstance(t, torch.Tensor)
                                and t.is_floating_point() else t, out)
        with torch.enable_grad():
            try:
                value = self.loss_fn(probe, batch.target)
            except (TypeError, AttributeError, RuntimeError, ValueError, IndexError) as exc:
                raise FasthessError(
                    f"loss_fn(output, target) failed on the first chunk ({type(exc).__name__}: {str(exc)[:200]}); the "
                    f"model's output is a {type(out).__name__} and the target a {type(batch.target).__name__}. Pass a "
                    "loss that takes them (e.g. lambda out, y: ce(out.logits, y) for a Hugging Face output), or name "
                    "the targets with batch=fasthess.BatchSpec(targets=...)") from exc
        refuse_without_second_derivative(value)
        if isinstance(value, torch.Tensor) and not value.requires_grad and \
                any(t.requires_grad for t in tensors_of(probe)):
            raise LossContractError(
                "the loss does not depend on the model's output: its value has no graph back to the output (a "
                ".detach(), .item(), .numpy() or torch.no_grad() inside loss_fn), so its Hessian would be 0; remove "
                "the detach, and compute the loss from the output with torch operations")
        return value, _leaves_read(value, probe, lambda o: self.loss_fn(o, batch.target))

    def _check_chunk(self, chunk: Chunk) -> tuple[tuple | None, str, list[int] | None]:
        """The first chunk's checks (see :meth:`_check_contract`)."""
        batch = chunk.batch
        bad = nonfinite_data(batch)
        if bad is not None:  # before the split tests, whose refusals would name the loss instead
            raise NonFiniteError(f"chunk {chunk.index}: {bad}; clean the data (the Hessian is undefined there)")
        out = self._first_output_fixed(batch)
        value, read = self._first_loss(out, batch)
        reached = self._reads_parameters(value)
        if reached:
            raise LossContractError(
                f"the loss reads the parameters {reached[:3]} outside the model's forward (e.g. an L2 penalty or "
                "a temperature inside the loss closure); fasthess substitutes θ only in the forward, so their "
                "curvature would be dropped. Move them into the model's forward, or pass the penalty as "
                "penalty=lambda params: ... (a function of the dict of parameters by name), whose Hessian is "
                "added exactly")
        if self.penalty is not None:
            self._check_penalty()
        rows = batch.rows
        if self.data.spec.batch_loss:
            return None, CONTRACT_BASES["declared"], read  # declared per batch: nothing to split
        if self.comm is None and self.data.one_chunk:  # nothing to split, but where the examples are cuts the loss
            with checking_forward():
                split = example_layout(self._forward_at(self._primals(), batch), batch.args, batch.kwargs, rows, out,
                                       self._seq_first())
            basis = CONTRACT_BASES["one chunk"]
        else:
            split, basis = self._check_model_splits(batch, out, read=read)
        if self.loss.kind == "callable" and rows < 2:
            raise LossContractError(
                "the first chunk has a single example, so fasthess cannot check that the loss splits over examples "
                "(a mean, a sum or per-example losses); use chunks of two or more examples (batch_size >= 2)")
        h = halfway(out, rows)
        second, fits = (split.cut.inner, split.fits or None) if split is not None else (self._seq_first(), None)
        halves = [(take_output_rows(out, lo, hi, rows, second, fits),
                   self.data.spec.read(take_rows(chunk.raw, lo, hi, rows)))
                  for lo, hi in ((0, h), (h, rows))] if rows >= 2 else None

        if self.loss.kind == "callable":
            self.loss.check(self._value64, out, batch, halves)
            return (out, chunk, fits), basis, read

        def value_of(o, b):
            with torch.no_grad():
                return self.loss_fn(o, b.target)

        self.loss.check(value_of, out, batch, halves)
        return None, basis, read

    def _check_model_splits(self, batch: Batch, out, where: str = "the first chunk", read: list[int] | None = None,
                            thorough: bool = True) -> tuple[Split | None, str]:
        """The forward's output rows on ``batch`` (``where``: what it is; ``out``: its output) are those of a
        sub-batch of it run alone, and the batch-level output leaves the loss reads (``read``, None: all) do not
        change with the batch (:mod:`fasthess._model_split`); ``thorough``: every sub-batch at θ and at a perturbed
        θ, else a spread sub-batch at θ. A forward that draws random numbers cannot be judged this way when
        ``allow_stochastic`` accepts it. Returns what the check found at θ (None: nothing was judged) and the basis
        (:data:`CONTRACT_BASES`)."""
        watch = GeneratorWatch(self.device)
        primals = self._primals()
        batch_stats, seq_first = self.modes.batch_statistics_modules(), self._seq_first()
        points = ((primals, out), (perturbed(primals), None)) if thorough else ((primals, out),)  # None: run there
        with checking_forward():
            try:
                accepted = [check_model_splits(self._forward_at(params, batch), batch.args, batch.kwargs, batch.rows,
                                               output, batch_stats, self.compute_dtype, where, seq_first, read,
                                               thorough)
                            for params, output in points]
                basis = "unjudged" if accepted[0] is None else "ghost" if batch_stats else "checked"
                return accepted[0], CONTRACT_BASES[basis] + _reading(accepted)
            except BatchDependentModelError as exc:
                random = watch.advanced() or self._differs_on_a_second_call(self._forward_at(primals, batch), batch,
                                                                             out, roundoff(self.compute_dtype))
                if random and self.allow_stochastic:
                    return None, CONTRACT_BASES["random"]  # allow_stochastic accepts a random operator
                if random and not watch.advanced():
                    raise StochasticModelError(random_draws(
                        "the model's forward gives another output on a second call with the same batch and weights "
                        "(random numbers from a generator of its own: a torch.Generator, numpy or Python's random; or "
                        "state kept outside the parameters and buffers, such as a call counter)",
                        self.model.training)) from exc
                raise

    @staticmethod
    def _differs_on_a_second_call(forward: Callable[[tuple, dict], object], batch: Batch, out, tol: float) -> bool:
        """Does a second forward of ``batch`` differ from its first output ``out`` beyond roundoff ``tol``? (After a
        refusal as mixing only: a random forward that the default generators do not show looks like one that
        mixes.)"""
        worst = worst_row_gap(out, forward(batch.args, batch.kwargs), batch.rows, torch.arange(batch.rows))
        return worst is not None and worst[0] > tol

    def _forward_at(self, params: list[torch.Tensor], batch: Batch) -> Callable[[tuple, dict], object]:
        """``forward(args, kwargs)``: the model on other inputs of ``batch`` (a sub-batch of it) at ``params``, as a
        check runs it (:meth:`_checking_params`)."""
        named = self._checking_params(params)
        return lambda args, kwargs: self._forward(named, replace(batch, args=args, kwargs=kwargs))

    def _checking_output(self, batch: Batch):
        """The model's output on ``batch`` at θ as a check runs the forward (:func:`checking_forward`), detached."""
        with checking_forward():
            return detached(self._forward(self._checking_params(self._primals()), batch))

    def _checking_params(self, params: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every parameter of the model by name for a check's forward (:func:`checking_forward`): ``params`` for the
        differentiated ones, the others detached, so that grad mode builds no graph to any of them."""
        return {**{n: p.detach() for n, p in self.model.named_parameters()}, **dict(zip(self.names, params))}

    def _seq_first(self) -> bool:
        """Does the model hold a sequence-first module (an RNN or attention with ``batch_first=False``), whose
        tensors are (T, N, ...)?"""
        return any(isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) and not m.batch_first
                   for m in self.model.modules())

    def _check_joined_splits(self, lone: Chunk, chunk: Chunk, read: list[int] | None) -> str:
        """First pass, after a first chunk of one row (which alone shows no mixing): the forward's split is judged,
        as on a first chunk, on that row and chunk ``chunk`` joined as one batch; when their inputs cannot be
        joined without padding (padding changes what the model sees, so a difference would not prove mixing) or
        the forward does not take the joined batch, on chunk ``chunk`` alone. ``read``: the output leaves the loss
        reads. Returns the basis (:data:`CONTRACT_BASES`)."""
        a, b = lone.batch, chunk.batch
        rows = a.rows + b.rows
        joined = join_rows((a.args, a.kwargs), (b.args, b.kwargs), a.rows, b.rows)
        if joined is not None and [t.shape[1:] for t in tensors_of(take_rows(joined, 0, a.rows, rows))] == \
                [t.shape[1:] for t in tensors_of((a.args, a.kwargs))]:
            batch = replace(a, args=joined[0], kwargs=joined[1], target=None, weight=None, rows=rows)
            try:
                out = self._checking_output(batch)
            except FasthessError:
                raise
            except FORWARD_ERRORS:  # not an input this model takes
                out = None
            if out is not None:
                return self._check_model_splits(batch, out, f"chunks 0 and {chunk.index} joined", read)[1]
        if b.rows < 2:
            return CONTRACT_BASES["unjudged"]
        return self._check_model_splits(b, self._later_output(chunk, a.rows), f"chunk {chunk.index}", read)[1]

    def _value64(self, out, batch):
        """The loss of a callable in float64 where it allows it, so that split tests are sharp."""
        with torch.no_grad():
            try:
                return self.loss_fn(cast_floating(out, torch.float64), cast_floating(batch.target, torch.float64))
            except (RuntimeError, TypeError):
                return self.loss_fn(out, batch.target)

    def _check_joined(self, chunk: Chunk, kept: tuple, out) -> None:
        """First pass, callable loss: the first chunk and this one, joined, must split as the first chunk did.

        The first chunk's halves can agree with a count-weighted mean by accident (a class-weighted or masked mean
        whose first chunk holds one class, or no masked rows); two different chunks rarely do. Chunks of different
        widths (each batch padded to its own longest sequence) are padded to the longer (:func:`join_rows`); the
        test runs only if that padding leaves each chunk's own loss unchanged, i.e. the loss ignores it. ``out``:
        the chunk's output (:meth:`_later_output`)."""
        out0, first, fits = kept
        watch = GeneratorWatch(self.device)
        b0, b1 = first.batch, chunk.batch
        rows = b0.rows + b1.rows
        if fits == ITEMS:  # one output per example in a sequence
            joined_out = type(out0)([*out0, *out]) if len(out0) == b0.rows and len(out) == b1.rows else None
        else:  # leaves with no example dimension stay whole
            whole = [i for i, fit in enumerate(fits or ()) if not isinstance(fit, tuple)]
            dims = [fit[0] if isinstance(fit, tuple) else 0 for fit in fits] if fits else None
            joined_out = join_rows(out0, out, b0.rows, b1.rows, whole, dims)
        target = join_rows(b0.target, b1.target, b0.rows, b1.rows)
        if joined_out is None or target is None or (b0.weight is None) != (b1.weight is None) \
                or not _finite(self._value64(out, b1)):
            return  # nothing to join, or a non-finite loss, which the pass's own finiteness check names
        weight = None if b0.weight is None else torch.cat([b0.weight, b1.weight])
        joined = Batch((), {}, target, weight, b0.count + b1.count, rows)
        parts = [(take_output_rows(joined_out, lo, hi, rows, fits=fits),
                  replace(b, target=take_rows(target, lo, hi, rows), weight=None if weight is None else weight[lo:hi]))
                 for b, lo, hi in ((b0, 0, b0.rows), (b1, b0.rows, rows))]
        mode = self.loss.mode
        try:
            try:
                if not all(_same(self._value64(o, b), self._value64(po, pb))
                           for (o, b), (po, pb) in zip(((out0, b0), (out, b1)), parts)):
                    return  # the loss reads the padding: the joined chunks are not a batch it was given
                self.loss.check(self._value64, joined_out, joined, parts)
            except FasthessError:
                raise
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError):
                self.loss.mode = mode  # the loss does not take the joined structure: this extra check cannot run
                return
            if self.loss.mode != mode:
                raise LossContractError(
                    f"the loss splits over examples as a {mode} on the first chunk but as a {self.loss.mode} over "
                    f"chunks 0 and {chunk.index} joined: its normalizer depends on the batch (a class-weighted or "
                    "masked mean, say); pass the torch.nn criterion itself (its weight/ignore_index are read), or "
                    "return per-example losses (reduction='none')")
        except LossContractError as exc:
            self._refuse_random(watch, exc)
            raise
        self._refuse_random(watch, None)

    def _check_penalty(self) -> None:
        """The penalty must be a function of the parameters dict it is given, not of the model's own tensors."""
        with torch.enable_grad():
            leaves = {n: p.detach().to(self.compute_dtype).requires_grad_(True)
                      for n, p in zip(self.names, self._params)}
            try:
                value = scalar_value(self.penalty(leaves), penalty=True)
            except (TypeError, AttributeError) as exc:
                raise FasthessError(
                    f"the penalty failed ({type(exc).__name__}: {str(exc)[:200]}); it is called with a dict of the "
                    "differentiated parameters by name, e.g. penalty=lambda params: 1e-4 * sum(p.pow(2).sum() for p "
                    "in params.values())") from exc
        reached = self._reads_parameters(value)
        if reached or not value.requires_grad:
            what = f"reads the model's parameters {reached[:3]}" if reached else "does not depend on its argument"
            raise LossContractError(
                f"the penalty {what}; it must be a function of the dict it is given (the differentiated parameters "
                "by name), e.g. penalty=lambda params: 1e-4 * sum(p.pow(2).sum() for p in params.values())")

    def _reads_parameters(self, value) -> list[str]:
        """The names of the model's own differentiated parameters that ``value``'s graph reaches."""
        trainable = [(n, p) for n, p in zip(self.names, self._params) if p.requires_grad]
        if not (isinstance(value, torch.Tensor) and value.requires_grad and trainable):
            return []
        grads = torch.autograd.grad(value.sum(), [p for _, p in trainable], allow_unused=True, retain_graph=True)
        return [n for (n, _), g in zip(trainable, grads) if g is not None]

"""Kept chunk-gradient graphs (fasthess._graph_cache): same products, rebuilt on any change, bounded memory."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fasthess
from conftest import dense_hessian, make_data, make_model
from fasthess.errors import DataChangedError, FasthessError


def _problem(kind: str = "cnn"):
    model, shape = make_model(kind)
    X, y = make_data(shape, n=23)
    return model, nn.CrossEntropyLoss(), X, y


def _assert_exact(op, model, loss, X, y, v) -> None:
    """op's product with v equals the dense float64 Hessian's (chunks of 5)."""
    torch.testing.assert_close(op.matvec(v), dense_hessian(model, loss, X, y, batch_size=5) @ v, rtol=1e-10, atol=1e-12)


def _op(model, loss, X, y, **kw):
    return fasthess.HessianOperator(model, loss, (X, y), batch_size=5, hvp="double-backward", **kw)


@contextlib.contextmanager
def _primed(kind: str = "cnn"):
    """Inside a fixed_weights block after its first product (which builds the graphs): model, loss, X, y, op, v,
    and that product as ``first``."""
    model, loss, X, y = _problem(kind)
    op = _op(model, loss, X, y)
    v = torch.randn(op.num_params, dtype=torch.float64)
    with op.fixed_weights():
        yield SimpleNamespace(model=model, loss=loss, X=X, y=y, op=op, v=v, first=op.matvec(v))


@pytest.mark.parametrize("kind", ["cnn", "bn_eval", "residual"])
def test_kept_graphs_give_bitwise_the_same_products(kind):
    model, loss, X, y = _problem(kind)
    cached, plain = _op(model, loss, X, y), _op(model, loss, X, y, graph_memory=0)
    V = torch.randn(cached.num_params, 2, dtype=torch.float64)
    with cached.fixed_weights(), plain.fixed_weights():
        first = cached.matmat(V)
        assert cached.graph_bytes > 0 and len(cached._graphs.graphs) == 5  # 23 examples in chunks of 5
        for _ in range(2):
            assert torch.equal(cached.matmat(V), first)
        assert torch.equal(plain.matmat(V), first) and plain.graph_bytes == 0
    assert cached.graph_bytes == 0  # freed when the block ends
    a = fasthess.eigs(cached, k=2, tol=1e-10)
    b = fasthess.eigs(plain, k=2, tol=1e-10)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_hvps == b.num_hvps


def test_graphs_are_rebuilt_after_an_optimizer_step_inside_a_block():
    with _primed() as p:
        model, loss, X, y, op, v, before = p.model, p.loss, p.X, p.y, p.op, p.v, p.first
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss(model(X), y).backward()
        opt.step()
        after = op.matvec(v)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, dense_hessian(model, loss, X, y, batch_size=5) @ v, rtol=1e-10, atol=1e-12)


def test_graphs_are_rebuilt_after_a_write_through_data():
    """``p.data`` writes bypass autograd's version counter; the snapshot compares values, so it still sees them."""
    with _primed() as p:
        next(p.model.parameters()).data.mul_(1.5)
        _assert_exact(p.op, p.model, p.loss, p.X, p.y, p.v)


def test_graphs_are_rebuilt_when_buffers_or_modes_change():
    with _primed("bn_eval") as p:
        model, loss, X, y, op, v = p.model, p.loss, p.X, p.y, p.op, p.v
        bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
        bn.running_var.mul_(3.0)  # an eval-mode Hessian depends on the running statistics
        _assert_exact(op, model, loss, X, y, v)
        model.train()  # train mode: per-chunk statistics, a different operator
        _assert_exact(op, model, loss, X, y, v)


def test_a_small_budget_keeps_a_stable_prefix_of_the_chunks():
    with _primed() as p:
        model, loss, X, y, v, ref = p.model, p.loss, p.X, p.y, p.v, p.first
        per_chunk = p.op.graph_bytes / len(p.op._graphs.graphs)
    op = _op(model, loss, X, y, graph_memory=int(2.5 * per_chunk))
    with op.fixed_weights():
        for _ in range(3):
            assert torch.equal(op.matvec(v), ref)
            assert sorted(op._graphs.graphs) == [0, 1] and op.graph_bytes <= 2.5 * per_chunk


def test_clear_graphs_frees_them_and_the_next_pass_rebuilds():
    with _primed() as p:
        p.op.clear_graphs()
        assert p.op.graph_bytes == 0
        assert torch.equal(p.op.matvec(p.v), p.first) and p.op.graph_bytes > 0


def test_no_graphs_kept_for_forward_mode_or_a_stochastic_model():
    model, loss, X, y = _problem()
    fwd = fasthess.HessianOperator(model, loss, (X, y), batch_size=5, hvp="forward-over-reverse")
    with fwd.fixed_weights():
        fwd.matvec(torch.randn(fwd.num_params, dtype=torch.float64))
        assert fwd.graph_bytes == 0
    torch.manual_seed(0)
    drop = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double().train()
    Xd, yd = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = _op(drop, loss, Xd, yd, allow_stochastic=True)
    with op.fixed_weights():
        op.matvec(torch.randn(op.num_params, dtype=torch.float64))
        assert op.graph_bytes == 0


def test_changed_data_is_still_detected_with_kept_graphs():
    with _primed() as p:
        p.op.data.resident[0][0] += 1.0
        with pytest.raises(DataChangedError):
            p.op.matvec(p.v)


def test_model_is_left_as_it_was():
    model, loss, X, y = _problem()
    state = {k: t.clone() for k, t in model.state_dict().items()}
    op = _op(model, loss, X, y)
    fasthess.eigs(op, k=1, tol=1e-6)
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GB"])
def test_bad_graph_memory_is_rejected(bad):
    model, loss, X, y = _problem()
    with pytest.raises(FasthessError, match="graph_memory"):
        _op(model, loss, X, y, graph_memory=bad)


def test_saved_bytes_counts_the_graph_of_the_backward_too():
    from fasthess._graph_cache import default_budget, saved_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 10))
    x, y = torch.randn(1000, 50), torch.randint(0, 10, (1000,))
    leaves = [p.detach().requires_grad_(True) for p in model.parameters()]
    params = dict(zip([n for n, _ in model.named_parameters()], leaves))
    with saved_bytes([*leaves, x, y], x.device) as fwd:
        nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    with saved_bytes([*leaves, x, y], x.device) as both:
        loss = nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
    hidden = 1000 * 200 * 4  # one (1000, 200) float32 activation
    assert hidden <= fwd.total() < both.total()
    param_bytes = sum(p.numel() * 4 for p in leaves)
    assert both.total(grads) >= both.total() + param_bytes - 4 * 10  # the gradients count (one may be saved)
    assert default_budget(torch.device("cpu")) > 0


def test_nothing_is_kept_outside_a_block():
    model, loss, X, y = _problem()
    op = _op(model, loss, X, y)
    op.matvec(torch.randn(op.num_params, dtype=torch.float64))
    assert op.graph_bytes == 0 and op._graphs is None


def test_state_no_snapshot_sees_cannot_go_stale_between_solves():
    """A Python attribute read by forward is invisible to the snapshot; graphs never outlive a solve."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.temp = nn.Linear(4, 3), 1.0

        def forward(self, x):
            return self.lin(x) / self.temp

    torch.manual_seed(0)
    model = Scaled().double()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = _op(model, nn.CrossEntropyLoss(), X, y)
    fasthess.eigs(op, k=1, tol=1e-8)
    model.temp = 0.25
    again = fasthess.eigs(op, k=1, tol=1e-8)
    fresh = fasthess.eigs(_op(model, nn.CrossEntropyLoss(), X, y, graph_memory=0), k=1, tol=1e-8)
    torch.testing.assert_close(again.eigenvalues, fresh.eigenvalues, rtol=1e-10, atol=0)


def test_an_interrupted_pass_drops_its_graphs():
    model, loss = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), nn.CrossEntropyLoss()
    X, y = torch.randn(25, 4, dtype=torch.float64), torch.randint(0, 3, (25,))
    batches = [(X[i:i + 5], y[i:i + 5]) for i in range(0, 25, 5)]
    batches[3] = (X[15:20, :3], y[15:20])  # wrong feature count: the pass fails at chunk 3
    op = fasthess.HessianOperator(model, loss, batches, hvp="double-backward")
    v = torch.randn(op.num_params, dtype=torch.float64)
    with op.fixed_weights():
        with pytest.raises(fasthess.FasthessError, match="failed on chunk 3"):
            op.matvec(v)
        assert op.graph_bytes == 0
        batches[:] = [(2 * X[i:i + 5], y[i:i + 5]) for i in range(0, 25, 5)]  # the data is fixed and rebuilt
        _assert_exact(op, model, loss, 2 * X, y, v)


def test_graph_memory_set_to_zero_inside_a_block_stops_their_use():
    with _primed() as p:
        model, loss, X, y, op, v = p.model, p.loss, p.X, p.y, p.op, p.v
        op.graph_memory = 0
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2.0)
        _assert_exact(op, model, loss, X, y, v)


def test_kept_bytes_include_the_gradients():
    model, loss, X, y = _problem()
    op = _op(model, loss, X, y)
    with op.fixed_weights():
        op.matvec(torch.randn(op.num_params, dtype=torch.float64))
        per_chunk = op.graph_bytes / len(op._graphs.graphs)
    assert per_chunk >= op.num_params * 8  # float64 gradients of every parameter, plus the saved activations


def test_a_forward_that_runs_torch_func_keeps_no_graphs_but_works():
    """torch.func.grad refuses the saved-tensor hooks that measure a graph; such a model is solved without kept graphs."""
    class Energy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x * torch.func.grad(lambda z: torch.tanh(z).pow(3).sum())(x))

    torch.manual_seed(0)
    model, loss = Energy().double(), nn.CrossEntropyLoss()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    op = _op(model, loss, X, y)
    v = torch.randn(op.num_params, dtype=torch.float64)
    with op.fixed_weights():
        _assert_exact(op, model, loss, X, y, v)
        assert op.graph_bytes == 0 and op._graphs.full
    dense = torch.linalg.eigvalsh(dense_hessian(model, loss, X, y, batch_size=5))
    torch.testing.assert_close(fasthess.eigs(op, k=1, tol=1e-10).eigenvalues, dense[-1:], rtol=1e-8, atol=0)


def test_a_preconditioned_solve_keeps_the_inner_operators_graphs():
    from fasthess.sharpness import PreconditionedOperator

    model, loss, X, y = _problem()
    inner = _op(model, loss, X, y)
    S = PreconditionedOperator(inner, torch.rand(inner.num_params, dtype=torch.float64) + 0.5)
    with S.fixed_weights():
        S.matvec(torch.randn(inner.num_params, dtype=torch.float64))
        assert inner.graph_bytes > 0
    assert inner.graph_bytes == 0


def test_kept_graphs_are_freed_after_a_solve():
    """Nodes that save their own output (tanh, log_softmax) must not pin kept graphs in a reference cycle."""
    import gc
    import weakref

    model, loss = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), nn.CrossEntropyLoss()
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    batches = [(X[i:i + 5].clone(), y[i:i + 5]) for i in range(0, 20, 5)]  # fresh tensors, as a loader yields
    alive = [weakref.ref(x) for x, _ in batches]
    op = fasthess.HessianOperator(model, loss, batches, hvp="double-backward")
    with op.fixed_weights():
        op.matvec(torch.randn(op.num_params, dtype=torch.float64))
        assert len(op._graphs.graphs) == 4
        assert op.graph_bytes >= sum(x.numel() * 8 for x, _ in batches)  # the graphs keep the batches alive
    del batches, op
    gc.collect()
    assert not any(r() is not None for r in alive)


def test_a_forward_mode_fallback_inside_a_block_still_checks_the_weights():
    class Square(torch.autograd.Function):  # no forward-mode formula: forward-over-reverse falls back
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 2 * x * g

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return Square.apply(self.lin(x)).squeeze(-1)

    torch.manual_seed(0)
    model, loss = Model().double(), nn.MSELoss()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    op = fasthess.HessianOperator(model, loss, (X, y), batch_size=4, hvp="forward-over-reverse")
    v = torch.randn(op.num_params, dtype=torch.float64)
    with op.fixed_weights(), pytest.warns(RuntimeWarning, match="falling back"):
        op.matvec(v)
        assert op.hvp_method == "double-backward"
        with torch.no_grad():
            model.lin.weight.mul_(3.0)
        torch.testing.assert_close(op.matvec(v), dense_hessian(model, loss, X, y, batch_size=4) @ v,
                                   rtol=1e-10, atol=1e-12)

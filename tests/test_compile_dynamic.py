"""torch.compile(dynamic=True) of csq_ext.attention with the default path: one graph for every
N, on both sides of the cost model's crossover, forward and backward (the automatic choice
is made inside the csq_ext::auto_fwd operator when the graph runs: csq_ext/_auto.py); and
torch.func's reverse-mode transforms refused with a csq_ext message (vmap works)."""
import warnings

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import csq_ext
from conftest import randn, rel_err
from csq_ext._cost import choose_path


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


H, D = 2, 16


def _lengths_across_the_crossover(causal=True, grad=False):
    """Lengths for which the eager choice is direct and chunked, both present."""
    lengths = [3, 64, 65, 300, 1000, 2500]
    choices = {choose_path(n, D, D, causal, "cpu", torch.get_num_threads(), H, grad=grad)
               for n in lengths}
    assert choices == {"direct", "chunked"}, choices  # the test spans the crossover
    return lengths


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_one_graph_for_every_length(gen, causal):
    f = torch.compile(csq_ext.attention, dynamic=True, fullgraph=True)
    for i, n in enumerate(_lengths_across_the_crossover(causal)):
        q, k, v = (randn(gen, 1, H, n, D, dtype=torch.float32) for _ in range(3))
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            y = f(q, k, v, causal=causal)
        want = csq_ext.attention(q, k, v, causal=causal)
        assert rel_err(y, want) <= 1e-5, n
    assert counters["stats"]["unique_graphs"] == 1


def test_one_graph_for_every_length_with_backward(gen):
    f = torch.compile(csq_ext.attention, dynamic=True, fullgraph=True)
    for i, n in enumerate(_lengths_across_the_crossover(grad=True)):
        q, k, v = (randn(gen, 1, H, n, D, dtype=torch.float64, requires_grad=True)
                   for _ in range(3))
        dy = randn(gen, 1, H, n, D, dtype=torch.float64)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            y = f(q, k, v)
            grads = torch.autograd.grad(y, (q, k, v), dy)
        want = csq_ext.attention(q, k, v)
        want_grads = torch.autograd.grad(want, (q, k, v), dy)
        assert rel_err(y, want) <= 1e-12, n
        for a, b in zip(grads, want_grads):
            assert rel_err(a, b) <= 1e-12, n
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_packed_sequences(gen):
    """cu_seqlens under the automatic choice in a graph: the same result as eager."""
    f = torch.compile(csq_ext.attention, dynamic=True, fullgraph=True)
    for cu in ([0, 5, 40], [0, 100, 100, 700]):
        n = cu[-1]
        q, k, v = (randn(gen, 1, H, n, D, dtype=torch.float32) for _ in range(3))
        cu = torch.tensor(cu)
        assert rel_err(f(q, k, v, cu_seqlens=cu), csq_ext.attention(q, k, v, cu_seqlens=cu)) \
            <= 1e-5


def test_compiled_state_calls_stay_correct(gen):
    """Calls with a carried or returned state keep the Python choice (a graph per side of the
    crossover, docs/compile.md): correct on both sides."""
    f = torch.compile(csq_ext.attention, dynamic=True)
    for n in (20, 2000):
        q, k, v = (randn(gen, 1, H, n, D, dtype=torch.float32) for _ in range(3))
        y, st = f(q, k, v, return_state=True)
        want, want_st = csq_ext.attention(q, k, v, return_state=True)
        assert rel_err(y, want) <= 1e-5 and rel_err(st.sums, want_st.sums) <= 1e-5


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacrev", "hessian"])
@pytest.mark.parametrize("path", ["auto", "direct", "chunked"])
def test_torch_func_reverse_mode_is_refused_by_csq(gen, transform, path):
    q, k, v = (randn(gen, 1, 2, 6, 3) for _ in range(3))

    def f(q_):
        return csq_ext.attention(q_, k, v, path=path)

    with pytest.raises(NotImplementedError, match="csq_ext: torch.func"):
        if transform == "grad":
            torch.func.grad(lambda q_: f(q_).sum())(q)
        elif transform == "vjp":
            torch.func.vjp(f, q)
        elif transform == "jacrev":
            torch.func.jacrev(f)(q)
        else:
            torch.func.hessian(lambda q_: f(q_).sum())(q)


@pytest.mark.parametrize("path", ["auto", "direct", "chunked"])
def test_torch_func_vmap_works(gen, path):
    qs = randn(gen, 3, 1, 2, 9, 4)
    k, v = randn(gen, 1, 2, 9, 4), randn(gen, 1, 2, 9, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the batching fallback's performance warning
        y = torch.func.vmap(lambda q: csq_ext.attention(q, k, v, path=path))(qs)
    want = torch.stack([csq_ext.attention(q, k, v, path=path) for q in qs])
    assert rel_err(y, want) <= 1e-12

"""No N x N allocation, forward or backward: tensor allocations seen by the profiler, and the
peak resident set size of a long sequence in a fresh process (which also sees buffers that do
not go through PyTorch's allocator)."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import csq_ext
from conftest import randn


def _allocation_sizes(prof):
    """Sizes in bytes of the individual allocations recorded by a profile_memory=True profile.

    The kineto result keeps one "[memory]" record per allocation (positive nbytes) and per
    free (negative). ``prof.events()`` folds most of them into their parent operators'
    cpu_memory_usage, so it is the fallback: each aten::empty*-like event's self memory is one
    allocation.
    """
    try:
        records = prof.profiler.kineto_results.events()
        sizes = [e.nbytes() for e in records if e.name() == "[memory]"]
        if sizes:
            return [s for s in sizes if s > 0]
    except AttributeError:
        pass
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_profiler_sees_no_quadratic_allocation(gen, causal):
    """N = 2048, float32: no single allocation reaches N*N bytes (a quarter of an N x N
    float32 matrix), forward and backward. A deliberate N*N-byte allocation inside the same
    profile is the control: it must be the one and only allocation that large."""
    N, D = 2048, 16
    q, k, v = (randn(gen, 1, 2, N, D, dtype=torch.float32, requires_grad=True)
               for _ in range(3))
    shift = torch.full((2,), 0.75, requires_grad=True)
    dy = randn(gen, 1, 2, N, D, dtype=torch.float32)
    limit = N * N * 4 // 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True) as prof:
        y = csq_ext.attention(q, k, v, shift=shift, causal=causal)
        grads = torch.autograd.grad(y, (q, k, v, shift), dy)
        control = torch.empty(limit, dtype=torch.uint8)
        del control
    assert all(torch.isfinite(g).all() for g in grads)
    sizes = _allocation_sizes(prof)
    assert len(sizes) >= 5, "the profiler recorded no allocations: the check would be blind"
    big = [s for s in sizes if s >= limit]
    assert big == [limit], f"allocations >= {limit} bytes: {big}"


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    import csq_ext

    # One thread: the machine running the suite is small and shared, and with several threads
    # the many small per-chunk GEMMs can spend seconds in OpenMP barriers. The footprint being
    # measured does not depend on it.
    torch.set_num_threads(1)
    N, D = 32768, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, D, requires_grad=True) for _ in range(3))
    dy = torch.randn(1, 1, N, D)
    # warm up on a short sequence: thread pools, lazy initialization, allocator arenas
    y = csq_ext.attention(q[:, :, :256], k[:, :, :256], v[:, :, :256])
    torch.autograd.grad(y, (q, k, v), dy[:, :, :256])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    finite = True
    for causal in (True, False):
        y = csq_ext.attention(q, k, v, causal=causal)
        grads = torch.autograd.grad(y, (q, k, v), dy)
        finite &= bool(torch.isfinite(y).all()) and all(bool(torch.isfinite(g).all())
                                                         for g in grads)
        del y, grads
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump({"before": before, "after": after, "finite": finite}, sys.stdout)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB on Linux")
def test_long_sequence_peak_rss():
    """N = 32768, Dk = Dv = 16, float32, forward + backward, causal and not, in a fresh
    process: the peak RSS grows by far less than an N x N float32 matrix (4 GiB). The bound,
    256 MiB, is also below an N x N matrix of any 1-byte type (1 GiB); the real footprint is a
    few MiB (inputs, outputs and gradients are 2 MiB each)."""
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    growth = result["after"] - result["before"]
    assert result["finite"]
    assert growth < 256 * 2 ** 20, f"peak RSS grew by {growth / 2 ** 20:.0f} MiB"

"""negativity_penalty against a brute-force N x N computation, and its gradients."""
import pytest
import torch

from csq_ext import negativity_penalty


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def brute_force(q, k, *, window, scale=None, shift=1.0, center=True):
    """mean of relu(-s_ij)^2 over i - window < j <= i, from the full N x N score matrix."""
    B, Hq, N, D = q.shape
    k = k.repeat_interleave(Hq // k.shape[1], 1)
    tau = D ** -0.5 if scale is None else scale
    c = shift.view(1, Hq, 1, 1) if isinstance(shift, torch.Tensor) else shift
    s = torch.empty(B, Hq, N, N, dtype=q.dtype)
    for i in range(N):
        mu = k[:, :, :i + 1].mean(2) if center else torch.zeros_like(k[:, :, 0])
        s[:, :, i] = tau * ((k - mu[:, :, None]) @ q[:, :, i, :, None])[..., 0]
    s = s + c
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    mask = (j <= i) & (j > i - window)
    return (torch.relu(-s) ** 2)[..., mask].mean()


@pytest.mark.parametrize("window", [1, 3, 8, 16, 100])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("N", [1, 13, 16, 40])
def test_matches_brute_force(window, center, N):
    g = _gen(N * 7 + window)
    q = torch.randn(2, 4, N, 6, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, N, 6, generator=g, dtype=torch.float64) + 0.5
    got = negativity_penalty(q, k, window=window, center=center, shift=0.3)
    want = brute_force(q, k, window=window, center=center, shift=0.3)
    assert got.dtype == torch.float64 and got.shape == ()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15), (got.item(), want.item())


def test_matches_brute_force_tensor_shift_and_scale():
    g = _gen(1)
    q = torch.randn(3, 2, 21, 5, generator=g, dtype=torch.float64)
    k = torch.randn(3, 1, 21, 5, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.2, -0.4], dtype=torch.float64)
    got = negativity_penalty(q, k, window=6, scale=0.9, shift=shift)
    want = brute_force(q, k, window=6, scale=0.9, shift=shift)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)


def test_zero_when_every_score_is_positive():
    g = _gen(2)
    # Without centering: positive q and k give <q, k> > 0, and c > 0.
    q = torch.rand(2, 2, 30, 4, generator=g, dtype=torch.float64)
    k = torch.rand(2, 2, 30, 4, generator=g, dtype=torch.float64)
    assert negativity_penalty(q, k, window=8, center=False, shift=0.1).item() == 0.0
    # With centering: keys within 0.01 of each other and c = 1 keep every score near 1.
    k = torch.ones(2, 2, 30, 4, dtype=torch.float64) * 5 \
        + 0.01 * torch.rand(2, 2, 30, 4, generator=g, dtype=torch.float64)
    q = torch.randn(2, 2, 30, 4, generator=g, dtype=torch.float64)
    assert negativity_penalty(q, k, window=8, center=True, shift=1.0).item() == 0.0
    # ... while a negative shift makes it positive.
    assert negativity_penalty(q, k, window=8, center=True, shift=-1.0).item() > 0.0


def test_gradcheck_float64():
    g = _gen(3)
    q = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.tensor([0.1, -0.2], dtype=torch.float64, requires_grad=True)
    for center in (True, False):
        assert torch.autograd.gradcheck(
            lambda q, k, s: negativity_penalty(q, k, window=4, shift=s, center=center),
            (q, k, shift))


def test_float32_and_bf16_inputs():
    g = _gen(4)
    q = torch.randn(2, 2, 50, 8, generator=g)
    k = torch.randn(2, 2, 50, 8, generator=g)
    want = brute_force(q.double(), k.double(), window=16)
    got = negativity_penalty(q, k, window=16)
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-5 * want.item()
    got16 = negativity_penalty(q.bfloat16(), k.bfloat16(), window=16)
    assert got16.dtype == torch.float32 and abs(got16.item() - want.item()) < 0.05 * want.item()


def test_memory_is_linear_in_n():
    """No N x N tensor: a long sequence with a short window fits easily."""
    g = _gen(5)
    q = torch.randn(1, 1, 50_000, 4, generator=g)
    k = torch.randn(1, 1, 50_000, 4, generator=g)
    assert torch.isfinite(negativity_penalty(q, k, window=8))


def test_empty_and_bad_input():
    q = torch.randn(1, 2, 0, 4)
    assert negativity_penalty(q, q, window=4).item() == 0.0
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="window"):
        negativity_penalty(q, q, window=0)
    with pytest.raises(ValueError, match="shift"):
        negativity_penalty(q, q, shift=torch.ones(3))
    with pytest.raises(ValueError, match="k must have shape"):
        negativity_penalty(q, torch.randn(1, 2, 6, 4))
    with pytest.raises(ValueError, match="multiple"):
        negativity_penalty(torch.randn(1, 3, 5, 4), q)

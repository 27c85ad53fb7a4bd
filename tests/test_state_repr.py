"""print(state) shows a CSQState's shapes, dtype, device and positions, never its sums."""
import torch

import csq_ext
from conftest import randn


def test_repr_shows_shapes_and_positions_not_tensors(gen):
    q, k, v = randn(gen, 3, 4, 9, 16), randn(gen, 3, 2, 9, 16), randn(gen, 3, 2, 9, 12)
    _, state = csq_ext.attention(q, k, v, return_state=True)
    _, state = csq_ext.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    text = repr(state)
    assert text == ("CSQState(sequences=3, heads_k=2, dim_k=16, dim_v=12, sums=(3, 2, 153, 13), "
                    "ref=(3, 2, 16), dtype=torch.float64, device=cpu, positions=[10, 10, 10])")
    assert str(state) == text and "tensor(" not in text


def test_repr_of_many_sequences_packed_and_special_states(gen):
    q, k, v = randn(gen, 1, 2, 40, 4), randn(gen, 1, 1, 40, 4), randn(gen, 1, 1, 40, 3)
    cu = torch.tensor([0] + list(range(4, 41, 4)))  # 10 sequences of 4
    cu[-2] = 35  # ... the last two of 3 and 5 positions
    _, state = csq_ext.attention(q, k, v, cu_seqlens=cu, return_state=True)
    assert repr(state).endswith("positions=3 to 5 over 10 sequences)")
    empty = csq_ext.CSQState.empty(20, 2, 8, 8)
    assert repr(empty).endswith("positions=0 each over 20 sequences)")
    grads = csq_ext.CSQState(empty.sums.requires_grad_(), empty.ref)
    assert "requires_grad=True" in repr(grads)
    meta = csq_ext.CSQState(empty.sums.to("meta"), empty.ref.to("meta"))
    assert "device=meta" in repr(meta) and "unknown (meta tensors)" in repr(meta)
    odd = empty.sums.detach().clone()
    odd[0, 1, -1, -1] = 7.0
    assert "(differs between heads)" in repr(csq_ext.CSQState(odd, empty.ref))
    assert repr(csq_ext.CSQState(1, None)) == "CSQState(sums=int, ref=NoneType)"

"""csq_ext.hf: CSQ attention inside transformers models (tiny random Llama- and Qwen2-style
decoders and a BERT-style encoder built from configs; no downloads).

Skipped only when transformers is not installed."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import TOL, assert_rel_close, randn, repository_folder

pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, BertConfig, BertModel, DynamicCache,  # noqa: E402
                          MistralConfig)

import csq_ext  # noqa: E402
from csq_ext import hf  # noqa: E402
from csq_ext.hf.convert import attention_modules  # noqa: E402
from csq_ext.reference import csq_attention_reference  # noqa: E402
from hf_models import FAMILIES, VOCAB, left_padded_prompts, tiny_model, tokens  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny (32-wide matrices): BLAS threads only add synchronization, and
    on a shared machine their spinning made these tests 50x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_equals_hand_computation(gen, family, device):
    """One attention module of the model == projections, RoPE and csq_ext.attention by hand,
    and == the float64 reference (GQA heads passed as they are, scaling -> scale)."""
    model = tiny_model(family, seed=1, device=device)
    attn = model.model.layers[0].self_attn
    attn.csq_shift = torch.tensor([0.7, -1.2, 1.1, 0.9], dtype=torch.float64, device=device)
    B, N = 2, 19
    x = randn(gen, B, N, 32, device=device)
    pos = torch.arange(N, device=device)[None].expand(B, N)
    cos, sin = model.model.rotary_emb(x, pos)
    y, weights = attn(x, position_embeddings=(cos, sin), attention_mask=None, position_ids=pos)
    assert weights is None

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    heads = lambda proj: proj(x).view(B, N, -1, 8).transpose(1, 2)  # noqa: E731
    q, k = apply_rotary_pos_emb(heads(attn.q_proj), heads(attn.k_proj), cos, sin)
    v = heads(attn.v_proj)
    assert (q.shape[1], k.shape[1]) == (4, 2)
    o = csq_ext.attention(q, k, v, scale=attn.scaling, shift=attn.csq_shift)
    want = attn.o_proj(o.transpose(1, 2).reshape(B, N, 32))
    assert_rel_close(y, want, 1e-12, "layer vs hand computation")
    ref = csq_attention_reference(q, k, v, scale=attn.scaling, shift=attn.csq_shift)
    assert_rel_close(y, attn.o_proj(ref.transpose(1, 2).reshape(B, N, 32)), TOL[torch.float64],
                     "layer vs reference")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_csq_cache_equals_full_recomputation(gen, family, device):
    """200 greedy tokens with CSQCache (prefill + in-place decode steps) are exactly those of
    generation without any cache (every step recomputes the whole sequence), and those of
    transformers' default DynamicCache (keys longer than queries)."""
    model = tiny_model(family, seed=2, device=device)
    prompt = tokens(gen, 2, 7).to(device)
    kw = dict(max_new_tokens=200, min_new_tokens=200, do_sample=False)
    cache = hf.CSQCache(model.config)
    with_state = model.generate(prompt, past_key_values=cache, **kw)
    full = model.generate(prompt, use_cache=False, **kw)
    assert with_state.shape == (2, 207)
    assert torch.equal(with_state, full)
    assert cache.get_seq_length() == 206  # the last token is generated, never fed back
    assert torch.equal(model.generate(prompt, past_key_values=DynamicCache(), **kw)[:, :40],
                       full[:, :40])


def test_cache_memory_flat_in_length(gen):
    """The cache holds the same bytes after 100 and after 2000 decoded tokens: per layer
    B * Hk * (F (Dv + 1) + Dk) numbers, F = Dk (Dk + 1) / 2 + Dk + 1."""
    model = tiny_model("llama", seed=3)
    cache = hf.CSQCache(model.config)
    sizes = {}
    with torch.no_grad():
        out = model(tokens(gen, 1, 5), past_key_values=cache, use_cache=True)
        for step in range(1, 2001):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            if step in (100, 2000):
                sizes[step] = cache.nbytes
    F = 8 * 9 // 2 + 8 + 1
    assert sizes[100] == sizes[2000] == 2 * 2 * (F * 9 + 8) * 8
    assert cache.get_seq_length() == 2005


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_per_sequence_runs(gen, family, device):
    """Right padding (and left padding) in a batch: the logits of every real token equal those
    of the sequence run alone."""
    model = tiny_model(family, seed=4, device=device)
    lengths = [11, 6, 9]
    seqs = [tokens(gen, 1, n).to(device) for n in lengths]
    for side in ("right", "left"):
        ids = torch.zeros(3, 11, dtype=torch.long, device=device)
        mask = torch.zeros(3, 11, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            cols = slice(0, len(s[0])) if side == "right" else slice(11 - len(s[0]), 11)
            ids[i, cols], mask[i, cols] = s[0], 1
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            batch = model(ids, attention_mask=mask, position_ids=pos).logits
            for i, s in enumerate(seqs):
                alone = model(s).logits[0]
                got = batch[i][mask[i].bool()]
                assert_rel_close(got, alone, 1e-12, f"{side}-padded row {i}")


def test_left_padded_batch_generation_equals_per_sequence(gen):
    """Batch generation with prompts of different lengths (left padding, CSQCache) gives each
    row the tokens it gets alone."""
    model = tiny_model("llama", seed=5)
    ids, mask, short, long = left_padded_prompts(gen)
    kw = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0)
    both = model.generate(ids, attention_mask=mask, past_key_values=hf.CSQCache(model.config), **kw)
    assert torch.equal(both[0, 5:], model.generate(short, use_cache=False, **kw)[0])
    assert torch.equal(both[1], model.generate(long, use_cache=False, **kw)[0])


def test_beam_search_with_csq_cache(gen):
    """reorder_cache: beam search with CSQCache equals beam search recomputing everything."""
    model = tiny_model("qwen2", seed=6)
    prompt = tokens(gen, 2, 6)
    kw = dict(max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(prompt, past_key_values=hf.CSQCache(model.config), **kw),
                       model.generate(prompt, use_cache=False, **kw))


def test_packed_batch_equals_separate_runs(gen):
    """Sequences packed in one row, told apart by position_ids restarting at 0 or by
    flash-style cu_seq_lens_q / cu_seq_lens_k, equal the sequences run separately."""
    model = tiny_model("llama", seed=7)
    seqs = [tokens(gen, 1, n) for n in (5, 8, 3)]
    ids = torch.cat(seqs, 1)
    pos = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    cu = torch.tensor([0, 5, 13, 16])
    with torch.no_grad():
        alone = torch.cat([model(s).logits[0] for s in seqs])
        by_position = model(ids, position_ids=pos).logits[0]
        by_cu = model(ids, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=8, max_length_k=8).logits[0]
        whole = model(ids).logits[0]
    assert_rel_close(by_position, alone, 1e-12, "packed by position_ids")
    assert_rel_close(by_cu, alone, 1e-12, "packed by cu_seq_lens")
    assert (whole[5:] - alone[5:]).abs().max() > 1e-3  # packing does change the result


def test_bidirectional_encoder_padding_excluded_from_centering(gen):
    """A BERT-style encoder converted to CSQ: non-causal, and a padded key counts neither in
    the weights nor in the centering mean (padded batch == each sequence alone)."""
    torch.manual_seed(8)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64)
    model = hf.convert(BertModel(cfg).double().eval(), shift=0.8)
    assert all(not m.is_causal for m in attention_modules(model))
    ids = tokens(gen, 2, 10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:, :6]).last_hidden_state[0]
        # the last query attends to the first key: bidirectional
        changed = ids[:1].clone()
        changed[0, -1] = (changed[0, -1] % (VOCAB - 1)) + 1
        first_moves = model(changed).last_hidden_state[0, 0] - batch[0, 0]
    assert_rel_close(batch[1, :6], alone, 1e-12, "padded encoder row")
    assert first_moves.abs().max() > 1e-6


def test_convert_keeps_weights_and_trains(gen):
    """convert() turns a softmax (SDPA) model into CSQ in place with every weight kept and a
    learnable per-head shift; a few Adam steps lower the loss and train the shift."""
    model = tiny_model("llama", seed=9, dtype=torch.float32, attn="sdpa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens(gen, 4, 24)
    with torch.no_grad():
        softmax_logits = model(ids).logits
        csq_logits = tiny_model("llama", seed=9, dtype=torch.float32)(ids).logits
    hf.convert(model, shift=1.0, learnable_shift=True)
    assert model.config._attn_implementation == "csq"
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    shifts = [m.csq_shift for m in model.model.layers.modules() if hasattr(m, "csq_shift")]
    assert len(shifts) == 2 and all(s.shape == (4,) and s.requires_grad for s in shifts)
    with torch.no_grad():
        converted = model(ids).logits
    assert_rel_close(converted, csq_logits, TOL[torch.float32], "converted vs csq from_config")
    assert (converted - softmax_logits).abs().max() > 1e-4  # it no longer runs softmax
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert any((s.detach() - 1.0).abs().max() > 1e-4 for s in shifts)


def test_bf16_autocast(gen):
    """Forward and backward under bfloat16 autocast: logits within bf16 accuracy of float32,
    finite gradients."""
    model = tiny_model("qwen2", seed=10, dtype=torch.float32)
    ids = tokens(gen, 2, 16)
    want = model(ids).logits.detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    assert_rel_close(out.logits.float(), want, 5e-2, "bf16 autocast logits")
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)


def test_refusals(gen):
    """What cannot be computed raises with a message that says why."""
    model = tiny_model("llama", seed=11)
    ids = tokens(gen, 1, 6)
    sdpa = tiny_model("llama", seed=11, attn="sdpa")
    with pytest.raises(RuntimeError, match="needs csq attention"):
        sdpa(ids, past_key_values=hf.CSQCache(sdpa.config), use_cache=True)
    cache = hf.CSQCache(model.config)
    model(ids, past_key_values=cache, use_cache=True)
    with pytest.raises(NotImplementedError, match="cannot remove tokens"):
        cache.crop(-1)
    model.config.attention_dropout = 0.1
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(ids)
    hf.register()
    torch.manual_seed(0)
    windowed = AutoModelForCausalLM.from_config(
        MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      sliding_window=4), attn_implementation="csq")
    with pytest.raises(ValueError, match="sliding windows"):
        windowed(ids)


def test_import_without_transformers():
    """csq_ext imports without transformers; csq_ext.hf says what to install."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import csq_ext\n"
            "try:\n    import csq_ext.hf\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ERR" in out.stdout and "pip install transformers==" in out.stdout


def test_bench_hf_generate_quick(tmp_path):
    """bench/bench_hf_generate.py on a tiny run: CSQCache's bytes stay put, the KV cache's grow."""
    sys.path.insert(0, repository_folder("bench"))
    import bench_hf_generate

    out = bench_hf_generate.main(["--device", "cpu", "--quick", "--json", str(tmp_path / "g.json")])
    first, last = out["rows"]
    assert first["csq_cache_mb"] == last["csq_cache_mb"] > 0
    assert last["sdpa_cache_mb"] > first["sdpa_cache_mb"] > 0
    assert all(r["csq_ms"] > 0 and r["sdpa_ms"] > 0 for r in out["rows"])

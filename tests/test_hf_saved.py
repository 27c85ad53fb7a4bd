"""Saved CSQ models stay CSQ (docs/saved_models.md): save_pretrained / from_pretrained of
converted Llama, Qwen2 and BERT models (plain, learnable shift, transfer parameters) give the
same logits; the config records the conversion; loading without csq_ext, with another
attention, or from an unknown record fails loudly; sentence-transformers' save / load.

Skipped only when transformers is not installed (the MiniLM tests: its model package)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import assert_rel_close, randn

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

from csq_ext import hf  # noqa: E402
from csq_ext.hf.convert import attention_modules  # noqa: E402
from csq_ext.hf.transfer import transfer_parameters  # noqa: E402
from hf_models import minilm_dir, tiny_model, tokens  # noqa: E402

VARIANTS = ["plain", "learnable_shift", "transfer"]


def converted(family: str, variant: str, gen):
    """A float32 softmax model converted to CSQ, its CSQ parameters moved off their initial
    values (so that a parameter lost on the way changes the logits)."""
    model = tiny_model(family, seed=21, dtype=torch.float32, attn="sdpa")
    hf.convert(model, shift=0.7, learnable_shift=variant != "plain", eps=1e-5)
    if variant == "transfer":
        hf.transfer.add_transfer_parameters(model, adapter_rank=3)
    with torch.no_grad():
        for p in transfer_parameters(model).values():
            p.add_(0.2 * randn(gen, *p.shape, dtype=p.dtype))
    return model


def run(model, ids, mask):
    out = model(ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def inputs(gen):
    ids = tokens(gen, 3, 11)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a right-padded row
    return ids, mask


def expected_record(variant: str) -> dict:
    return {"format": "csq_ext.hf/1", "kernel": "csq", "shift": 0.7,
            "learnable_shift": variant != "plain", "center": True, "eps": 1e-5,
            "head_scale": variant == "transfer", "adapter_rank": 3 if variant == "transfer" else 0,
            "csq_ext_version": __import__("csq_ext").__version__}


def expected_csq_tensors(family: str, variant: str) -> set[str]:
    """The state-dict names docs/saved_models.md lists for a 2-layer model."""
    names = set()
    for i in range(2):
        p = f"encoder.layer.{i}.attention.self" if family == "bert" else f"model.layers.{i}.self_attn"
        q, k = ("query", "key") if family == "bert" else ("q_proj", "k_proj")
        if variant != "plain":
            names.add(f"{p}.csq_shift")
        if variant == "transfer":
            names.add(f"{p}.csq_head_scale")
            names |= {f"{p}.{proj}.csq_lora_{ab}" for proj in (q, k) for ab in "ab"}
    return names


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "bert"])
def test_save_pretrained_from_pretrained_round_trip(family, variant, gen, tmp_path):
    model = converted(family, variant, gen)
    ids, mask = inputs(gen)
    with torch.no_grad():
        want = run(model, ids, mask)
    model.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__]
    assert config["attn_implementation"] == "csq"
    assert config["csq_attention"] == expected_record(variant)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in saved if "csq" in k} == expected_csq_tensors(family, variant)
    assert not any("parametrizations" in k for k in saved)  # pretrained names unchanged

    auto = AutoModel if family == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config._attn_implementation == "csq"
    with torch.no_grad():
        got = run(loaded, ids, mask)
    assert_rel_close(got, want, 1e-6, "logits after from_pretrained")
    assert (got - want).abs().max() <= 1e-6
    ours, theirs = transfer_parameters(model), transfer_parameters(loaded)
    assert set(ours) == set(theirs) and len(ours) == len(expected_csq_tensors(family, variant))
    for name, p in theirs.items():
        assert isinstance(p, torch.nn.Parameter) and p.requires_grad
        assert torch.equal(p, ours[name]), name
    # The record survives a second save (the loaded config carries it again).
    loaded.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["csq_attention"] == expected_record(variant)
    assert again["attn_implementation"] == "csq"
    # The test can fail: the softmax model on the same weights gives other logits.
    softmax = tiny_model(family, seed=21, dtype=torch.float32, attn="sdpa")
    with torch.no_grad():
        assert (run(softmax, ids, mask) - want).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_base_model_of_a_causal_lm_checkpoint(family, gen, tmp_path):
    """AutoModel.from_pretrained of a converted *ForCausalLM checkpoint: the base model, CSQ,
    with the decoder's hidden states; in bfloat16 too, where the CSQ parameters follow."""
    model = converted(family, "transfer", gen)
    model.save_pretrained(tmp_path)
    ids, mask = inputs(gen)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is type(model.model)
    with torch.no_grad():
        want = model.model(ids, attention_mask=mask).last_hidden_state
        got = base(ids, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max() <= 1e-6
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    params = transfer_parameters(half)
    assert params and all(p.dtype == torch.bfloat16 for p in params.values())
    with torch.no_grad():
        logits = half(ids, attention_mask=mask).logits.float()
        full = model(ids, attention_mask=mask).logits
    assert_rel_close(logits, full, 5e-2, "bfloat16 logits")


def test_loaded_model_keeps_training(gen, tmp_path):
    """The restored CSQ parameters are trainable parameters of the loaded model."""
    model = converted("llama", "transfer", gen)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.train()
    ids = tokens(gen, 2, 12)
    loaded(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in transfer_parameters(loaded).items()}
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
                         for g in grads.values())


def _load_in_fresh_process(code: str) -> subprocess.CompletedProcess:
    """Python without csq_ext (it is made unimportable), running ``code``."""
    prelude = "import sys; sys.modules['csq_ext'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loading_without_csq_ext_fails_loudly(family, gen, tmp_path):
    """A process that has not imported csq_ext.hf cannot load the checkpoint as softmax."""
    converted(family, "learnable_shift", gen).save_pretrained(tmp_path)
    auto = "AutoModel" if family == "bert" else "AutoModelForCausalLM"
    run_ = _load_in_fresh_process(
        f"from transformers import {auto}\n"
        f"try:\n    {auto}.from_pretrained({str(tmp_path)!r})\n"
        f"except ValueError as e:\n    print('REFUSED', e)\nelse:\n    print('LOADED')\n")
    assert run_.returncode == 0, run_.stderr[-3000:]
    assert "REFUSED" in run_.stdout and 'attn_implementation="csq"' in run_.stdout, run_.stdout


def test_another_attention_on_csq_weights_is_refused(gen, tmp_path):
    converted("qwen2", "learnable_shift", gen).save_pretrained(tmp_path)
    for impl in ("sdpa", "eager"):
        with pytest.raises(ValueError, match="trained for csq attention"):
            AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl)


@pytest.mark.parametrize("edit,match", [
    ({"format": "csq_ext.hf/2"}, "format"),
    ({"window": 4}, "unknown fields"),
    ({"kernel": "softmax"}, "kernel must be one of"),
    ({"learnable_shift": "yes"}, "learnable_shift must be a bool"),
    ({"adapter_rank": -1}, "adapter_rank must be an int >= 0"),
    ({"eps": float("nan")}, "eps must be a finite number"),
])
def test_unknown_record_is_refused(edit, match, gen, tmp_path):
    converted("llama", "plain", gen).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["csq_attention"].update(edit)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_csq_tensor_is_reported_and_starts_at_its_initial_value(gen, tmp_path, caplog):
    model = converted("llama", "transfer", gen)
    model.save_pretrained(tmp_path)
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    for name in ("model.layers.1.self_attn.csq_shift", "model.layers.0.self_attn.csq_head_scale",
                 "model.layers.0.self_attn.q_proj.csq_lora_b"):
        del tensors[name]
    save_file(tensors, file, metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    report = "\n".join(r.getMessage() for r in caplog.records)
    assert "MISSING" in report and "model.layers.1.self_attn.csq_shift" in report
    layers = loaded.model.layers
    assert torch.equal(layers[1].self_attn.csq_shift, torch.full((4,), 0.7))
    assert torch.equal(layers[0].self_attn.csq_head_scale, torch.ones(4))
    assert torch.equal(layers[0].self_attn.q_proj.csq_lora_b, torch.zeros(32, 3))
    assert torch.equal(layers[0].self_attn.csq_shift, model.model.layers[0].self_attn.csq_shift)


def test_record_follows_conversions(gen):
    """convert replaces an earlier conversion with its transfer parameters, record and all."""
    model = tiny_model("llama", seed=22, dtype=torch.float32, attn="sdpa")
    names = set(model.state_dict())
    hf.convert(model, learnable_shift=True)
    hf.transfer.add_transfer_parameters(model, head_scale=True, adapter_rank=2)
    assert model.config.csq_attention["adapter_rank"] == 2
    hf.transfer.add_transfer_parameters(model, head_scale=False, adapter_rank=0)
    assert set(model.state_dict()) == names | {f"model.layers.{i}.self_attn.csq_shift"
                                               for i in range(2)}
    hf.convert(model, kernel="rebased")
    assert set(model.state_dict()) == names
    assert all(not m.q_proj._forward_hooks for m in attention_modules(model))
    record = model.config.csq_attention
    assert (record["kernel"], record["learnable_shift"], record["head_scale"],
            record["adapter_rank"]) == ("rebased", False, False, 0)
    with pytest.raises(ValueError, match="shift must be a finite number"):
        hf.convert(model, shift=float("inf"))
    with pytest.raises(ValueError, match="adapter_rank must be an int"):
        hf.transfer.add_transfer_parameters(model, adapter_rank=1.5)


def test_from_config_of_a_saved_config_builds_the_csq_model(gen, tmp_path):
    """AutoConfig of a CSQ checkpoint builds a CSQ model with the parameters at their
    initial values (what convert gives)."""
    from transformers import AutoConfig
    converted("llama", "transfer", gen).save_pretrained(tmp_path)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert fresh.config._attn_implementation == "csq"
    params = transfer_parameters(fresh)
    assert len(params) == len(expected_csq_tensors("llama", "transfer"))
    assert all(torch.equal(p, torch.full_like(p, 0.7)) for n, p in params.items()
               if n.endswith("csq_shift"))
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in params.items()
               if n.endswith("csq_lora_b"))


# ------------------------------------------------------------------------------------------
# sentence-transformers and the shipped all-MiniLM-L6-v2 parameters
# ------------------------------------------------------------------------------------------
SENTENCES = ["Return the number of items in the container.", "A short one.",
             "Raise ValueError if the string cannot be parsed as a date."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pytest.importorskip("sentence_transformers")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield minilm_dir(tmp_path_factory.mktemp("minilm"))
    torch.set_num_threads(threads)


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a, b).mean().item()


def test_sentence_transformer_converts_in_place_and_round_trips(minilm, tmp_path):
    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer(minilm, device="cpu")
    original = model.encode(SENTENCES, convert_to_tensor=True)
    assert hf.convert(model, params="all-MiniLM-L6-v2") is model
    inner = model[0].auto_model
    assert inner.config._attn_implementation == "csq"
    assert all(not m.is_causal and m.csq_kernel == "csq" for m in attention_modules(inner))
    ours = model.encode(SENTENCES, convert_to_tensor=True)
    assert 0.9 < _cos(ours, original) < 0.9999  # CSQ, close to the original

    model.save(str(tmp_path / "st"))
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    assert config["csq_attention"]["adapter_rank"] == 4
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    again = loaded.encode(SENTENCES, convert_to_tensor=True)
    assert (again - ours).abs().max() <= 1e-6

    run_ = _load_in_fresh_process(
        "from sentence_transformers import SentenceTransformer\n"
        f"try:\n    SentenceTransformer({str(tmp_path / 'st')!r}, device='cpu')\n"
        "except ValueError as e:\n    print('REFUSED', e)\nelse:\n    print('LOADED')\n")
    assert "REFUSED" in run_.stdout and "csq" in run_.stdout, run_.stdout + run_.stderr[-2000:]


def test_shipped_parameters_load_by_name(minilm):
    """Every shipped set loads into the BERT model with its stored values; the trained sets
    move the embeddings closer to the original than the zero-shot swap."""
    from transformers import BertModel
    original = BertModel.from_pretrained(minilm, attn_implementation="sdpa").eval()
    names = hf.pretrained.available()
    assert "all-MiniLM-L6-v2" in names and "all-MiniLM-L6-v2/csq_lora4" in names
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    def embed(model):
        with torch.no_grad():
            h = model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    base = embed(original)
    zero_shot = embed(hf.convert(BertModel.from_pretrained(minilm).eval()))
    for name in names:
        model = hf.convert(BertModel.from_pretrained(minilm).eval(), params=name)
        stored = json.load(open(hf.pretrained.path(name)))["tensors"]
        params = transfer_parameters(model)
        assert len(params) == len(stored) > 0
        for key, value in stored.items():
            key = key.replace(".parametrizations.weight.0.", ".")  # files from before the hooks
            assert torch.equal(params[key], torch.tensor(value, dtype=params[key].dtype)), key
        if name.endswith(("csq", "csq_lora4", "csq_fixed_shift")) or name == "all-MiniLM-L6-v2":
            assert _cos(embed(model), base) > _cos(zero_shot, base) + 0.01, name
    assert hf.pretrained.path("all-MiniLM-L6-v2") == hf.pretrained.path("all-MiniLM-L6-v2/csq_lora4")
    with pytest.raises(ValueError, match="shipped"):
        hf.convert(BertModel.from_pretrained(minilm), params="all-MiniLM-L12-v2")
    with pytest.raises(ValueError, match="shipped"):
        hf.convert(BertModel.from_pretrained(minilm), params="all-MiniLM-L6-v2/../csq")


def test_package_data_is_installed():
    """The shipped parameters are package data (they must be in the wheel)."""
    assert os.path.isfile(hf.pretrained.path("all-MiniLM-L6-v2"))
    assert len(hf.pretrained.available()) == 8

"""csq_ext.vllm without starting an engine: the entry point, the record reader, the routing of
CSQ checkpoints to our classes (and of every other checkpoint to vLLM's), the refusals of
configurations a CSQ model cannot serve, and vLLM's own memory accounting of the per-request
state (constant in the context length). Needs vLLM (docs/vllm.md)."""
import copy
import json
from importlib.metadata import entry_points

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the plugin's tests run in the vLLM "
                    "environment (docs/vllm.md, .ci/vllm_stage.sh)")

import torch  # noqa: E402
import vllm_checkpoints as ck  # noqa: E402

import csq_ext.vllm  # noqa: E402
from csq_ext.state import num_features  # noqa: E402
from csq_ext.vllm.record import CSQRecord, read_record  # noqa: E402

RECORD = {"format": "csq_ext.hf/1", "kernel": "csq", "shift": 0.5, "learnable_shift": False,
          "center": True, "eps": 1e-6, "head_scale": False, "adapter_rank": 0,
          "csq_ext_version": "0.1.0"}


@pytest.fixture(scope="module", autouse=True)
def registered():
    csq_ext.vllm.register()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved CSQ Llama and the same model saved as a softmax checkpoint."""
    csq = ck.save_checkpoint(ck.converted("llama"), str(tmp_path_factory.mktemp("csq")))
    plain = str(tmp_path_factory.mktemp("softmax"))
    ck.tiny_model("llama").save_pretrained(plain)
    return csq, plain


def test_entry_point_is_installed():
    eps = [e for e in entry_points(group="vllm.general_plugins") if e.name == "csq_ext"]
    assert len(eps) == 1 and eps[0].value == "csq_ext.vllm.plugin:register"
    assert eps[0].load() is csq_ext.vllm.register


def test_record_reader():
    assert read_record({"csq_attention": RECORD}) == CSQRecord(shift=0.5)
    rebased = read_record({"csq_attention": dict(RECORD, kernel="rebased")})
    assert rebased.attention_shift == 0.0 and rebased.attention_center is False
    bad = [({"format": "csq_ext.hf/2"}, "format"), ({"future_option": 1}, "future_option"),
           ({"kernel": "taylor"}, "kernel"), ({"kernel": "softmax"}, "kernel"),
           ({"shift": float("nan")}, "shift"), ({"eps": -1.0}, "eps"),
           ({"center": 1}, "center"), ({"adapter_rank": -2}, "adapter_rank"),
           ({"adapter_rank": 1.5}, "adapter_rank")]
    for change, field in bad:
        with pytest.raises(ValueError, match=field):
            read_record({"csq_attention": dict(RECORD, **change)})
    with pytest.raises(ValueError, match="csq_attention"):
        read_record({"csq_attention": "csq"})


def test_csq_checkpoints_route_to_csq_classes(checkpoints):
    """vLLM's own config loading (every process runs it) sends a CSQ checkpoint to our class
    and a softmax checkpoint of the same architecture to vLLM's; config.json is unchanged."""
    from vllm.transformers_utils.config import get_config

    csq, plain = checkpoints
    assert get_config(csq, trust_remote_code=False).architectures == ["CSQLlamaForCausalLM"]
    assert get_config(plain, trust_remote_code=False).architectures == ["LlamaForCausalLM"]
    with open(f"{csq}/config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_unservable_checkpoints_are_refused(tmp_path, checkpoints):
    from vllm.transformers_utils.config import get_config

    csq, _ = checkpoints
    with open(f"{csq}/config.json") as f:
        config = json.load(f)
    cases = [({"architectures": ["MistralForCausalLM"], "model_type": "mistral"},
              "serves CSQ checkpoints of"),
             ({"csq_attention": dict(config["csq_attention"], kernel="linear")}, "kernel")]
    for i, (change, match) in enumerate(cases):
        d = tmp_path / str(i)
        d.mkdir()
        with open(d / "config.json", "w") as f:
            json.dump(dict(copy.deepcopy(config), **change), f)
        with pytest.raises(ValueError, match=match):
            get_config(str(d), trust_remote_code=False)


def _engine_config(path, **kw):
    from vllm.engine.arg_utils import EngineArgs

    args = dict(model=path, skip_tokenizer_init=True, dtype="float32",
                gpu_memory_utilization=ck.GPU_MEMORY_UTILIZATION)
    args.update(kw)
    return EngineArgs(**args).create_engine_config()


@pytest.mark.parametrize("option,match", [({"enable_prefix_caching": True}, "prefix caching")])
def test_configurations_a_csq_model_cannot_serve_are_refused(checkpoints, option, match):
    csq, _ = checkpoints
    with pytest.raises(ValueError, match=match):
        _engine_config(csq, max_model_len=512, **option)


def _state_spec(vllm_config):
    """The cache spec vLLM derives from a CSQ layer (MambaBase.get_kv_cache_spec)."""
    from vllm.config import set_current_vllm_config

    from csq_ext.vllm.layer import CSQStateAttention

    vllm_config.compilation_config.static_forward_context.clear()
    with set_current_vllm_config(vllm_config):
        layer = CSQStateAttention(4, 16, 2, 0.25, CSQRecord(), "model.layers.0.self_attn.attn")
        return layer.get_kv_cache_spec(vllm_config)


def _concurrency(vllm_config, spec, layers, memory):
    """vLLM's own count of how many requests of max_model_len tokens fit into `memory` bytes
    of cache (the number its engine logs as "Maximum concurrency")."""
    from vllm.v1.core.kv_cache_utils import (get_kv_cache_configs,
                                             get_max_concurrency_for_kv_cache_config)

    if vllm_config.cache_config.kv_cache_layout is None:  # what the CPU engine resolves
        vllm_config.cache_config.kv_cache_layout = "LBNHC"
    specs = {f"model.layers.{i}.self_attn.attn": spec for i in range(layers)}
    config = get_kv_cache_configs(vllm_config, [specs], [memory])[0]
    return get_max_concurrency_for_kv_cache_config(vllm_config, config)


def test_per_request_state_is_constant_in_context_length(checkpoints):
    """vLLM's accounting for the CSQ model: every request holds one page of states per layer,
    Hk (F (Dv + 1) + Dk) float32 numbers, whatever max_model_len; the concurrency that 64 MiB
    of cache allows is the same at 1K and 32K tokens, while the softmax model's KV cache allows
    32x fewer requests at 32K than at 1K."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    csq, plain = checkpoints
    memory, layers = 64 << 20, 2
    per_layer = 2 * (num_features(16) * 17 + 16) * 4  # Hk = 2, Dk = Dv = 16, float32
    counts, softmax = {}, {}
    for n in (1024, 32768):
        vc = _engine_config(csq, max_model_len=n)
        spec = _state_spec(vc)
        assert spec.page_size_bytes == per_layer
        assert spec.max_memory_usage_bytes(vc) == per_layer  # one page, at any length
        counts[n] = _concurrency(vc, spec, layers, memory)
        vs = _engine_config(plain, max_model_len=n)
        kv = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.float32)
        softmax[n] = _concurrency(vs, kv, layers, memory)
    assert counts[1024] == counts[32768] == pytest.approx(memory // (layers * per_layer), abs=1)
    assert softmax[1024] == pytest.approx(32 * softmax[32768], rel=0.01)

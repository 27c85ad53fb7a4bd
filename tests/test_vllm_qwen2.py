"""vLLM serving a CSQ Qwen2 checkpoint (csq_ext.vllm), token for token against transformers:
a converted, saved tiny Qwen2 (biases on q, k, v) with the plain conversion (one float shift,
no trained CSQ tensors), float32, in eager mode (--enforce-eager). The same schedule as
test_vllm_llama.py: mixed prompt lengths submitted together, requests joining as others
finish (max_num_seqs = 3), chunked prefill (max_num_batched_tokens = 24). One engine for the
module. Needs vLLM (docs/vllm.md)."""
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the plugin's tests run in the vLLM "
                    "environment (docs/vllm.md, .ci/vllm_stage.sh)")

import vllm_checkpoints as ck  # noqa: E402

LENGTHS = [70, 1, 4, 25, 130, 9]
NEW_TOKENS = [5, 10, 3, 8, 6, 12]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = ck.converted("qwen2", shift=0.75, seed=3)
    path = ck.save_checkpoint(model, str(tmp_path_factory.mktemp("csq_qwen2")))
    llm = ck.engine(path, max_num_seqs=3, max_num_batched_tokens=24, enforce_eager=True)
    yield model, llm
    del llm


def test_greedy_tokens_equal_transformers(served):
    model, llm = served
    ids = ck.prompts(LENGTHS, seed=4)
    assert ck.vllm_greedy(llm, ids, NEW_TOKENS) == ck.hf_greedy(model, ids, NEW_TOKENS)

"""vLLM serving a CSQ Llama checkpoint (csq_ext.vllm), token for token against transformers.

One engine for the module (an engine takes a minute to start on 2 cores), run as users run it
(vLLM's default torch.compile, no flags): a converted, saved tiny Llama with every kind of
trained CSQ tensor (per-head shift, per-head query scale, rank-2 q/k adapters), float32.
Prompts of different lengths (one token up to 150) are submitted together with different
numbers of new tokens; with max_num_seqs = 4 and 9 requests, requests join as others finish
and reuse their state slots, and with max_num_batched_tokens = 32 every prompt longer than 32
tokens is prefilled in pieces (chunked prefill) continuing from its slot's state, beside
other requests' decode steps. Needs vLLM (the vLLM test environment: docs/vllm.md)."""
import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: the plugin's tests run in the vLLM "
                    "environment (docs/vllm.md, .ci/vllm_stage.sh)")

import vllm_checkpoints as ck  # noqa: E402

LENGTHS = [1, 2, 7, 33, 64, 150, 5, 97, 3]
NEW_TOKENS = [12, 5, 9, 3, 7, 4, 11, 6, 8]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = ck.converted("llama", learnable_shift=True, head_scale=True, adapter_rank=2)
    path = ck.save_checkpoint(model, str(tmp_path_factory.mktemp("csq_llama")))
    llm = ck.engine(path, max_num_seqs=4, max_num_batched_tokens=32)
    yield model, llm
    del llm


def test_greedy_tokens_equal_transformers(served):
    model, llm = served
    ids = ck.prompts(LENGTHS, seed=1)
    want = ck.hf_greedy(model, ids, NEW_TOKENS)
    got = ck.vllm_greedy(llm, ids, NEW_TOKENS)
    assert got == want


def test_second_batch_reuses_slots(served):
    """A later batch runs in slots that finished requests left behind (not cleared): the same
    tokens as transformers again, in another submission order."""
    model, llm = served
    ids = ck.prompts([40, 1, 17, 120], seed=2)
    n = [6, 9, 4, 5]
    assert ck.vllm_greedy(llm, ids, n) == ck.hf_greedy(model, ids, n)

"""The quality tooling: the MQAR generator's properties, and a few-step run of every script
on a tiny configuration (the loss must be finite; nothing is learned in 3 steps)."""
import json
import math
import os
import sys

import pytest
import torch

from conftest import repository_folder

ROOT = os.path.dirname(repository_folder("quality"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from csq_ext.nn import KERNELS  # noqa: E402
from quality import ablate_csq, sweep_mqar, train_lm, train_mqar  # noqa: E402
from quality.models import TinyLM  # noqa: E402
from quality.mqar import IGNORE, multiquery_ar  # noqa: E402

TINY = dict(seq_len=32, num_kv_pairs=4, vocab_size=64, d_model=16, num_heads=2, steps=3,
            batch_size=8, num_train=64, num_test=16, eval_every=2, log_every=1)


@pytest.mark.parametrize("seq_len,kv,vocab", [(64, 4, 100), (128, 16, 8192), (32, 8, 40)])
def test_mqar_answers_are_the_paired_values(seq_len, kv, vocab):
    x, y = multiquery_ar(num_examples=50, seq_len=seq_len, num_kv_pairs=kv, vocab_size=vocab,
                         seed=3)
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype == torch.int64
    assert x.min() >= 0 and x.max() < vocab
    half = vocab // 2
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:2 * kv:2], row_x[1:2 * kv:2]
        assert all(1 <= k < half for k in keys) and len(set(keys)) == kv
        assert all(half <= v < vocab for v in values) and len(set(values)) == kv
        pairs = dict(zip(keys, values))
        queries = [(t, lab) for t, lab in enumerate(row_y) if lab != IGNORE]
        assert len(queries) == kv                      # every key is queried once
        assert all(t >= 2 * kv for t, _ in queries)    # after the context
        assert sorted(row_x[t] for t, _ in queries) == sorted(keys)
        for t, lab in queries:
            assert lab == pairs[row_x[t]]              # the answer is the paired value


def test_mqar_is_seeded():
    a = multiquery_ar(num_examples=20, seq_len=64, num_kv_pairs=8, seed=5)
    b = multiquery_ar(num_examples=20, seq_len=64, num_kv_pairs=8, seed=5)
    c = multiquery_ar(num_examples=20, seq_len=64, num_kv_pairs=8, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mqar_gaps_favour_short_distances():
    _, y = multiquery_ar(num_examples=400, seq_len=256, num_kv_pairs=8, seed=0)
    pos = (y != IGNORE).nonzero()[:, 1] - 16
    assert (pos < 60).float().mean() > 0.4   # uniform placement would give about 0.25


def test_mqar_rejects_bad_sizes():
    with pytest.raises(ValueError, match="even"):
        multiquery_ar(num_examples=1, seq_len=33, num_kv_pairs=4)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        multiquery_ar(num_examples=1, seq_len=32, num_kv_pairs=9)


def test_model_is_identical_across_kernels_but_the_similarity():
    counts = set()
    for kernel in KERNELS:
        torch.manual_seed(0)
        m = TinyLM(50, 16, 2, 2, kernel=kernel)
        counts.add(m.num_params())
        h = m(torch.randint(0, 50, (2, 12)))
        assert h.shape == (2, 12, 16) and m.head(h).shape == (2, 12, 50)
    assert len(counts) == 1


@pytest.mark.parametrize("kernel", KERNELS)
def test_train_mqar_three_steps(kernel):
    cfg = train_mqar.MQARConfig(kernel=kernel, **TINY)
    res = train_mqar.run(cfg, verbose=False)
    assert res["steps_done"] == 3 and res["diverged_at"] is None
    assert all(math.isfinite(e["loss"]) for e in res["train_log"])
    assert 0.0 <= res["accuracy"] <= 1.0 and math.isfinite(res["test_loss"])


def test_train_mqar_cli_with_penalty_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    train_mqar.main(args + ["--kernel=csq", "--penalty-weight=0.5", "--learnable-shift=1",
                            f"--out={out}"])
    res = json.loads(out.read_text())
    assert res["config"]["penalty_weight"] == 0.5
    assert all(math.isfinite(e["penalty"]) for e in res["train_log"])
    assert "RESULT kernel=csq" in capsys.readouterr().out


def test_sweep_writes_table_and_png(tmp_path):
    base = train_mqar.MQARConfig(**{**TINY, "steps": 1})
    s = sweep_mqar.sweep(base, ["csq", "softmax"], [32], [4, 16], [1e-3], str(tmp_path),
                         verbose=False)
    assert len(s["runs"]) == 2   # kv=16 does not fit in 32 tokens
    for name in ("summary.json", "table.md", "accuracy.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| csq |" in (tmp_path / "table.md").read_text()


def test_ablation_mqar_variants(tmp_path):
    base = train_mqar.MQARConfig(**{**TINY, "steps": 1})
    s = ablate_csq.ablate("mqar", base, ["base", "no_center", "shift_0", "no_normalize",
                                         "penalty_0.1"], [0.1], str(tmp_path), verbose=False)
    assert set(s["variants"]) == {"base", "no_center", "shift_0", "no_normalize",
                                  "penalty_0.1"}
    cfg = json.loads((tmp_path / "no_center.json").read_text())["config"]
    assert cfg["center"] is False and cfg["kernel"] == "csq"


def test_lm_split_is_fixed_by_hash():
    assert train_lm.is_validation("json/decoder.py", 5) == train_lm.is_validation(
        "json/decoder.py", 5)
    _, files = train_lm.stdlib_files()
    val = [f for f in files if train_lm.is_validation(f, 5)]
    assert 0.02 < len(val) / len(files) < 0.09


def test_train_lm_two_steps(tmp_path):
    cfg = train_lm.LMConfig(kernels="csq,softmax,linear", seq_len=32, d_model=16, num_heads=2,
                            steps=2, batch_size=4, eval_every=1, val_windows=4,
                            val_percent=20, max_files=40, out=str(tmp_path / "lm.json"))
    res = train_lm.run(cfg, verbose=False)
    for kernel in ("csq", "softmax", "linear"):
        r = res["runs"][kernel]
        assert r["steps_done"] == 2 and all(v is not None and math.isfinite(v)
                                            for v in r["val_loss"])
    assert len({r["params"] for r in res["runs"].values()}) == 1
    assert (tmp_path / "lm.png").stat().st_size > 0
    assert res["data"]["val_files"] > 0 and res["data"]["train_files"] > 0


def test_train_lm_bf16_autocast_cpu(tmp_path):
    cfg = train_lm.LMConfig(kernels="csq,taylor,rebased", seq_len=32, d_model=16,
                            num_heads=2, steps=2, batch_size=4, eval_every=2, val_windows=4,
                            val_percent=20, max_files=40, bf16=True, penalty_weight=0.1)
    res = train_lm.run(cfg, verbose=False)
    for r in res["runs"].values():
        assert r["diverged_at"] is None and r["nonfinite_val_at"] is None

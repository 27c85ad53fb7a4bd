"""bench/bench_decode.py (the decode-bandwidth benchmark the GPU suite runs) on a tiny case:
it must run on this machine's device, and what it reports must be consistent."""
import json
import sys

from conftest import repository_folder

sys.path.insert(0, repository_folder("bench"))

import bench_decode  # noqa: E402


def test_bench_decode_quick_reports_consistent_numbers(tmp_path):
    out_json, out_md = tmp_path / "d.json", tmp_path / "d.md"
    result = bench_decode.main(["--device", "cpu", "--quick", "--json", str(out_json),
                                "--md", str(out_md)])
    saved = json.loads(out_json.read_text())
    assert saved["rows"] == result["rows"] and saved["copy_gbs"] > 0
    (row,) = saved["rows"]
    B, Hk, D = row["B"], row["Hk"], row["Dk"]
    F = D * (D + 1) // 2 + D + 1
    assert row["bytes"] > 2 * 4 * B * Hk * F * (D + 1)  # the state is read and written
    assert row["csq_us"] > 0 and row["sdpa_us_L64"] > 0
    assert abs(row["csq_gbs"] - row["bytes"] / row["csq_us"] / 1e3) <= 1e-9 * row["csq_gbs"]
    assert "| B | Hq |" in out_md.read_text()

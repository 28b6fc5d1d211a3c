"""bench.py's smoke test: every benchmark runs on a tiny model and reports its figures (no speed is asserted)."""
import json

import pytest

from conftest import run_script


def test_the_tiny_benchmark_reports_every_figure_as_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "bench.json"
    result = run_script("bench.py", "--tiny", "--device", "cpu", "--vary", "arch=gpt2,modern", "--loop",
                        "--decode", "--tokenize", "--json", str(out), env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["arch"] for r in report["train"]] == ["gpt2", "modern"]
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in report["train"])
    assert report["loop"]["tokens_per_s"] > 0
    assert report["decode"]["greedy_fp32_equals_hf"] is True
    decode = report["decode"]
    assert all(decode[f"{name}_tokens_per_s"] > 0 for name in ("hf_fp32", "ours_fp32", "ours_bf16", "ours_int8"))
    assert decode["bandwidth_gb_s"] > 0 and decode["ours_int8_weight_mb"] < decode["ours_bf16_weight_mb"]
    assert 0 <= decode["int8_vs_fp32"]["agreement"] <= 1 and decode["startup_first_token_s"] > 0
    assert report["tokenize"]["ratio"] > 0 and report["tokenize"]["tokens"] > 0
    assert "training" in result.stdout and "loop / table" in result.stdout

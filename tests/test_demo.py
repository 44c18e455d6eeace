"""The main job (README's first command) runs end to end offline: the embedded model's quiz by default (its
accuracy is tested in test_shapes.py), a tiny random checkpoint with --random-weights."""

import re
import subprocess
import sys


def test_demo_with_random_weights_builds_reloads_as_remote_code_and_generates(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "modeling_tokenpacker.demo", "--random-weights", "--output-dir", str(tmp_path),
         "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert f"checkpoint: {tmp_path}" in out
    for line in ("building a tiny TokenPacker", "reloading it in a fresh Python process", "loading ",
                 "generating up to 8 tokens", "random weights, so the answer below is nonsense"):
        assert line in out, line
    assert "prompt tokens: " in out and ", of which 144 image tokens" in out
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


def test_demo_takes_a_relative_output_dir(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modeling_tokenpacker.demo", "--random-weights", "--output-dir",
                             "relative/demo", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "relative" / "demo" / "tiny_tokenpacker" / "config.json").is_file()
    assert re.search(r"generated text: '.+'", result.stdout)


def test_a_missing_image_gets_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "modeling_tokenpacker.demo", "--model", str(tmp_path), "--image",
                             str(tmp_path / "nope.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(f"--image {tmp_path / 'nope.png'}: no such file")


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, "-m", "modeling_tokenpacker.demo", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert "(default: What is in the" in result.stdout and "(default: 24)" in result.stdout

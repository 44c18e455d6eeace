"""An installed (non-editable) package carries what it needs: a wheel built from the repository, installed into a
folder of its own, imports from there, finds its chat template (whose source lives in processing/) and its embedded
demo checkpoint, and runs the demo end to end."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_wheel_install_finds_the_chat_template_and_runs_the_demo(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", str(REPO), "-w",
                            str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("modeling_tokenpacker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "modeling_tokenpacker/chat_templates_data/vicuna_v1.jinja" in names
    assert "modeling_tokenpacker/modeling_common.py" in names and not any(n.startswith("tests/") for n in names)
    assert {"modeling_tokenpacker/demo_model/model.safetensors", "modeling_tokenpacker/demo_model/training.json",
            "modeling_tokenpacker/demo_model/tokenizer.json"} <= set(names)
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    probe = subprocess.run([sys.executable, "-c", "import modeling_tokenpacker as m; print(m.__file__); "
                            "print(m.load_chat_template().count('generation'))"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    location, generation_markers = probe.stdout.split()[-2:]
    assert Path(location).is_relative_to(site) and int(generation_markers) >= 2
    demo = subprocess.run([sys.executable, "-m", "modeling_tokenpacker.demo", "--output-dir", "out", "--questions",
                           "2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "accuracy: " in demo.stdout and "model class:  transformers_modules." in demo.stdout

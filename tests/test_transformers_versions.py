"""The shipped remote code across the transformers versions setup.cfg allows: the oldest (4.46), the last 4.x
(4.57) and this one (CI installs the newest release).

The `legacy_python` fixture (conftest.py) provides a virtual environment for each older release. Checkpoints saved
by either side load, through every Auto class and without the package, in the other, and generate the same tokens.
The whole range, every minor release, is measured by tests/compat/matrix.py (README, "Tested with").
"""

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image

from modeling_tokenpacker.demo import synthesize_image
from compat.venvs import installed_version
from test_remote_code import PROMPTS, run_child

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("version_images")
    paths = []
    for i, size in enumerate([(480, 360), (300, 500)]):
        paths.append(folder / f"image{i}.png")
        synthesize_image(*size).save(paths[-1])
    return paths


def generate_here(checkpoint, image_paths):
    """Tokens this transformers version generates from `checkpoint` (loaded as remote code)."""
    model = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    inputs = processor(images=[Image.open(p) for p in image_paths], text=PROMPTS, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def test_checkpoint_saved_here_loads_and_generates_identically_under_an_older_release(
    tmp_path, legacy_python, tiny_model, processor, image_paths
):
    checkpoint = tmp_path / "saved_here"
    tiny_model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    legacy = run_child(checkpoint, image_paths, cwd=tmp_path, python=legacy_python)
    assert legacy["loaded"]["AutoModelForImageTextToText"] == "TokenPackerForConditionalGeneration"
    assert legacy["loaded"]["AutoProcessor"] == "TokenPackerProcessor"
    assert legacy["chat_template"] == processor.chat_template
    assert legacy["tokens"] == generate_here(checkpoint, image_paths)


BUILD_UNDER_LEGACY = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import transformers
    from modeling_tokenpacker.demo import build_demo_checkpoint
    build_demo_checkpoint(sys.argv[2])
    print(json.dumps({"transformers": transformers.__version__}))
    """
)


def test_checkpoint_saved_under_an_older_release_loads_and_generates_identically_here(
    tmp_path, legacy_python, image_paths
):
    checkpoint = tmp_path / "saved_legacy"
    built = subprocess.run([str(legacy_python), "-c", BUILD_UNDER_LEGACY, str(REPO_ROOT), str(checkpoint)],
                           capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert built.returncode == 0, built.stderr[-3000:]
    assert json.loads(built.stdout.strip().splitlines()[-1])["transformers"] == installed_version(legacy_python)
    legacy = run_child(checkpoint, image_paths, cwd=tmp_path, python=legacy_python)
    here = run_child(checkpoint, image_paths, cwd=tmp_path)
    assert here["loaded"] == legacy["loaded"]
    assert here["tokens"] == legacy["tokens"]


def test_vlora_checkpoint_saved_here_loads_and_generates_identically_under_an_older_release(
    tmp_path, legacy_python, tokenizer, image_paths
):
    from modeling_tokenpacker.demo_vlora import build_vlora_demo_checkpoint

    checkpoint = build_vlora_demo_checkpoint(tmp_path / "vlora_saved_here")
    legacy = run_child(checkpoint, image_paths, cwd=tmp_path, python=legacy_python)
    assert legacy["loaded"]["AutoModelForImageTextToText"] == "VLoRAForConditionalGeneration"
    assert legacy["loaded"]["AutoProcessor"] == "VLoRAProcessor"
    assert legacy["tokens"] == generate_here(checkpoint, image_paths)


BUILD_VLORA_UNDER_LEGACY = BUILD_UNDER_LEGACY.replace(
    "from modeling_tokenpacker.demo import build_demo_checkpoint",
    "from modeling_tokenpacker.demo_vlora import build_vlora_demo_checkpoint as build_demo_checkpoint")


def test_vlora_checkpoint_saved_under_an_older_release_loads_and_generates_identically_here(
    tmp_path, legacy_python, image_paths
):
    checkpoint = tmp_path / "vlora_saved_legacy"
    built = subprocess.run([str(legacy_python), "-c", BUILD_VLORA_UNDER_LEGACY, str(REPO_ROOT), str(checkpoint)],
                           capture_output=True, text=True, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert built.returncode == 0, built.stderr[-3000:]
    legacy = run_child(checkpoint, image_paths, cwd=tmp_path, python=legacy_python)
    here = run_child(checkpoint, image_paths, cwd=tmp_path)
    assert here["loaded"] == legacy["loaded"] and here["loaded"]["AutoModel"] == "VLoRAModel"
    assert here["tokens"] == legacy["tokens"]


def test_the_transformers_contract_holds_under_an_older_release(legacy_python):
    """tests/test_transformers_contract.py run by the older release (the points it has; the rest skip)."""
    result = subprocess.run([str(legacy_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(REPO_ROOT / "tests" / "test_transformers_contract.py")],
                            capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout.strip().splitlines()[-1]

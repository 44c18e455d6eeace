"""Shared fixtures: tiny tokenizer, processor and models built in-process (seconds, no downloads)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_tokenpacker.demo import build_tiny_model, build_tiny_processor, build_tiny_tokenizer, synthesize_image  # noqa: E402


def dtype_kwargs(dtype):
    """`from_pretrained` takes `dtype` since transformers 4.56 and `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


@pytest.fixture(scope="session")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """Tiny TokenPacker (scale 2, 144 tokens per image) with a LLaMA language model, in eval mode."""
    return build_tiny_model(tokenizer)


@pytest.fixture(scope="session")
def processor(tokenizer, tiny_model):
    return build_tiny_processor(tokenizer, tiny_model.config.image_seq_length)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tiny_model, processor):
    """The tiny model and processor saved once (remote code included); tests only read it."""
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    tiny_model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def images():
    """Three synthesized RGB images of different sizes and aspect ratios."""
    return [synthesize_image(480, 360), synthesize_image(300, 500), synthesize_image(336, 336)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


# A second virtual environment with the oldest supported transformers (and this process's torch), created once and
# reused; `TOKENPACKER_LEGACY_VENV` chooses where, pip's cache keeps the wheels.
LEGACY_TRANSFORMERS = "4.46.3"
DEFAULT_VENV = Path.home() / ".cache" / "modeling_tokenpacker" / f"venv-transformers-{LEGACY_TRANSFORMERS}"
SETUP_TIMEOUT_S = 900


def venv_python(venv):
    return venv / "bin" / "python"


def legacy_is_ready(python):
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import transformers, torch; print(transformers.__version__)"],
                           capture_output=True, text=True, timeout=120)
    return probe.returncode == 0 and probe.stdout.strip() == LEGACY_TRANSFORMERS


@pytest.fixture(scope="session")
def legacy_python():
    venv = Path(os.environ.get("TOKENPACKER_LEGACY_VENV", DEFAULT_VENV))
    python = venv_python(venv)
    if not legacy_is_ready(python):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        install = [str(python), "-m", "pip", "install", "--quiet", torch_pin, f"transformers=={LEGACY_TRANSFORMERS}",
                   "safetensors", "numpy", "pillow", "huggingface_hub<1.0", "accelerate"]
        result = subprocess.run(install, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
        assert result.returncode == 0, f"could not build the transformers {LEGACY_TRANSFORMERS} venv:\n{result.stderr[-3000:]}"
    assert legacy_is_ready(python)
    return python

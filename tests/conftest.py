"""Shared fixtures: tiny tokenizer, processor and models built in-process (seconds, no downloads)."""

import os
import sys

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
def images():
    """Three synthesized RGB images of different sizes and aspect ratios."""
    return [synthesize_image(480, 360), synthesize_image(300, 500), synthesize_image(336, 336)]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield

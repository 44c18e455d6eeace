"""Shared fixtures: tiny tokenizer, processor and models built in-process (seconds, no downloads)."""

import contextlib
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_tokenpacker.demo import build_tiny_model, build_tiny_processor, build_tiny_tokenizer, synthesize_image  # noqa: E402


# Modules whose tests take the longest (old-release environments, subprocesses, torchrun) run first, so that the two
# xdist workers do not end on one of them while the other idles; whole modules move, keeping their fixtures' scope.
SLOW_MODULES = ("test_transformers_versions", "test_conversion", "test_hd", "test_training_cli", "test_parity",
                "test_conversion_faults", "test_upgrade", "test_packaging", "test_shapes")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        return SLOW_MODULES.index(name) if name in SLOW_MODULES else len(SLOW_MODULES)

    items.sort(key=rank)


def dtype_kwargs(dtype):
    """`from_pretrained` takes `dtype` since transformers 4.56 and `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


@contextlib.contextmanager
def record_forward_inputs(model):
    """Collects, per call of `model`, the keyword arguments that were not None (what `generate` hands forward)."""
    calls = []

    def record(module, args, kwargs):
        calls.append({key: value for key, value in kwargs.items() if value is not None})

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


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
def vlora(tokenizer):
    """Tiny VLoRA (deltas on q, k, v, o, m of layers 1 and 3, B drawn non-zero) with a LLaMA language model, in eval
    mode; tests that change it work on a copy."""
    from modeling_tokenpacker.demo_vlora import build_tiny_vlora_model

    return build_tiny_vlora_model(tokenizer)


@pytest.fixture(scope="session")
def vlora_processor(tokenizer):
    from modeling_tokenpacker.demo_vlora import build_tiny_vlora_processor

    return build_tiny_vlora_processor(tokenizer)


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


# Virtual environments with older releases of the supported range beside this process's torch (compat/venvs.py),
# built once and reused (`TOKENPACKER_VENV_ROOT` chooses where; pip's cache keeps the wheels), for the remote-code
# round trip with this one: the oldest supported release; `TOKENPACKER_LEGACY_TRANSFORMERS="4.46.3 4.57.6"` adds
# others (tests/compat/matrix.py covers every release line).
LEGACY_TRANSFORMERS = tuple(os.environ.get("TOKENPACKER_LEGACY_TRANSFORMERS", "4.46.3").split())


@pytest.fixture(scope="session", params=LEGACY_TRANSFORMERS)
def legacy_python(request):
    """Python of an environment with `request.param` (a transformers version), this torch, PIL and pytest."""
    from compat.venvs import CACHE_ROOT, ensure_venv

    return ensure_venv(CACHE_ROOT / f"venv-transformers-{request.param}", request.param, ["pillow", "pytest"])

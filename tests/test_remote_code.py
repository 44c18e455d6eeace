"""A saved checkpoint loads through every Auto class in a fresh process that cannot import this package."""

import json
import subprocess
import sys
import textwrap

import torch

from modeling_tokenpacker.demo import synthesize_image

PROMPTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]

# The first lines of every fresh-process child: importing this package fails there, as on a user's machine.
BLOCK_PACKAGE = textwrap.dedent(
    """
    import importlib.abc, json, re, sys

    class BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_tokenpacker":
                raise ImportError("modeling_tokenpacker must not be importable here")
            return None

    sys.meta_path.insert(0, BlockPackage())
    """
)

CHILD = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch
    from PIL import Image
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                              AutoModelForImageTextToText, AutoProcessor)

    path, image_paths, prompts = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
    loaded = {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    loaded["AutoConfig"] = type(config).__name__
    loaded["AutoImageProcessor"] = type(AutoImageProcessor.from_pretrained(path, trust_remote_code=True)).__name__
    base = AutoModel.from_pretrained(path, trust_remote_code=True)
    loaded["AutoModel"] = type(base).__name__
    loaded["AutoModelForCausalLM"] = type(AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)).__name__
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
    loaded["AutoModelForImageTextToText"] = type(model).__name__
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    loaded["AutoProcessor"] = type(processor).__name__
    images = [Image.open(p) for p in image_paths]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    print(json.dumps({
        "loaded": loaded,
        "module": type(model).__module__,
        "imported_package": any(name.startswith("modeling_tokenpacker") for name in sys.modules),
        "tokens": new_tokens.tolist(),
        "text": processor.batch_decode(new_tokens, skip_special_tokens=True),
        "base_has_lm_head": hasattr(base, "lm_head"),
        "chat_template": processor.chat_template,
        "image_seq_length": processor.image_seq_length,
    }))
    """
)


def run_child(checkpoint, image_paths, cwd, python=sys.executable):
    """Load `checkpoint` through every Auto class in a fresh `python -I` that cannot import the package."""
    result = subprocess.run(
        [str(python), "-I", "-c", CHILD, str(checkpoint), ",".join(map(str, image_paths)), json.dumps(PROMPTS)],
        capture_output=True, text=True, cwd=cwd, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_saved_checkpoint_loads_every_auto_class_and_generates_without_the_package(tmp_path, tiny_model, processor):
    checkpoint = tmp_path / "tiny_ckpt"
    tiny_model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    for name in ("configuration_tokenpacker.py", "modeling_tokenpacker.py", "processing_tokenpacker.py",
                 "image_processing_tokenpacker.py", "preprocessor_config.json", "chat_template.json"):
        assert (checkpoint / name).is_file(), name
    auto_map = json.loads((checkpoint / "config.json").read_text())["auto_map"]
    assert set(auto_map) >= {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}

    image_paths = []
    for i, size in enumerate([(480, 360), (300, 500)]):
        image_paths.append(tmp_path / f"image{i}.png")
        synthesize_image(*size).save(image_paths[-1])
    child = run_child(checkpoint, image_paths, cwd=tmp_path)

    assert child["loaded"] == {
        "AutoConfig": "TokenPackerConfig",
        "AutoImageProcessor": "TokenPackerImageProcessor",
        "AutoModel": "TokenPackerModel",
        "AutoModelForCausalLM": "TokenPackerForConditionalGeneration",
        "AutoModelForImageTextToText": "TokenPackerForConditionalGeneration",
        "AutoProcessor": "TokenPackerProcessor",
    }
    assert child["module"].startswith("transformers_modules.")
    assert not child["imported_package"]
    assert not child["base_has_lm_head"]
    assert child["chat_template"] == processor.chat_template
    assert child["image_seq_length"] == processor.image_seq_length

    from PIL import Image

    inputs = processor(images=[Image.open(p) for p in image_paths], text=PROMPTS, return_tensors="pt")
    with torch.no_grad():
        expected = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert child["tokens"] == expected[:, inputs["input_ids"].shape[1]:].tolist()

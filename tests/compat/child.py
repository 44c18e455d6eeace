"""One side of a version-matrix cell, run by tests/compat/matrix.py in an environment of the release under test.

    python -I child.py run CHECKPOINT IMAGE[,IMAGE...] [--quantization 4bit]
    python -I child.py build CHECKPOINT REPO

`run` loads CHECKPOINT through every Auto class with `trust_remote_code=True` while `modeling_tokenpacker` cannot
be imported, generates greedily for two left-padded prompts and prints one JSON line (classes, tokens, the logits of
every step). `build` saves the demo's tiny checkpoint with this release, importing the package from REPO.
"""

import argparse
import importlib.abc
import json
import sys

PROMPTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]
NEW_TOKENS = 6


class BlockPackage(importlib.abc.MetaPathFinder):
    """Makes `modeling_tokenpacker` unimportable: the checkpoint's own files must carry the model."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_tokenpacker":
            raise ImportError("modeling_tokenpacker must not be importable here")
        return None


def run(checkpoint, image_paths, quantization):
    sys.meta_path.insert(0, BlockPackage())
    import torch
    import transformers
    from PIL import Image

    auto = {name: getattr(transformers, name) for name in (
        "AutoConfig", "AutoProcessor", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText")}
    notes = []
    try:
        auto["AutoImageProcessor"] = transformers.AutoImageProcessor
        auto["AutoImageProcessor"].from_pretrained  # noqa: B018 (5.4 ... gates the public name on torchvision)
    except ImportError as error:
        from transformers.models.auto.image_processing_auto import AutoImageProcessor

        auto["AutoImageProcessor"] = AutoImageProcessor
        notes.append(f"transformers.AutoImageProcessor: {str(error).strip().split('. ')[0]}")
    loaded = {}
    for name in ("AutoConfig", "AutoImageProcessor", "AutoProcessor", "AutoModel", "AutoModelForCausalLM"):
        loaded[name] = type(auto[name].from_pretrained(checkpoint, trust_remote_code=True)).__name__
    load_kwargs = {"trust_remote_code": True}
    if quantization == "4bit":
        load_kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = auto["AutoModelForImageTextToText"].from_pretrained(checkpoint, **load_kwargs).eval()
    loaded["AutoModelForImageTextToText"] = type(model).__name__
    processor = auto["AutoProcessor"].from_pretrained(checkpoint, trust_remote_code=True)
    images = [Image.open(path) for path in image_paths]
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                return_dict_in_generate=True, output_logits=True)
    return {
        "transformers": transformers.__version__,
        "loaded": loaded,
        "module": type(model).__module__,
        "imported_package": any(name.startswith("modeling_tokenpacker") for name in sys.modules),
        "notes": notes,
        "tokens": output.sequences[:, inputs["input_ids"].shape[1]:].tolist(),
        "logits": [step.float().tolist() for step in output.logits],
    }


def build(checkpoint, repo, family="tokenpacker"):
    sys.path.insert(0, repo)
    import transformers
    from modeling_tokenpacker.demo import build_demo_checkpoint
    from modeling_tokenpacker.demo_vlora import build_vlora_demo_checkpoint

    (build_vlora_demo_checkpoint if family == "vlora" else build_demo_checkpoint)(checkpoint)
    return {"transformers": transformers.__version__}


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("checkpoint")
    run_parser.add_argument("images")
    run_parser.add_argument("--quantization", choices=["4bit"])
    build_parser = sub.add_parser("build")
    build_parser.add_argument("checkpoint")
    build_parser.add_argument("repo")
    build_parser.add_argument("--family", choices=["tokenpacker", "vlora"], default="tokenpacker")
    args = parser.parse_args()
    if args.command == "run":
        result = run(args.checkpoint, args.images.split(","), args.quantization)
    else:
        result = build(args.checkpoint, args.repo, args.family)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

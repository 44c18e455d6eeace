"""What users of transformers' LLaVA expect, for VLoRA: remote code through every Auto class, device_map splits,
quantized language models, PEFT and a pipeline."""

import copy
import re
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import AutoModelForImageTextToText, pipeline

from modeling_tokenpacker import VLoRAForConditionalGeneration
from test_remote_code import PROMPTS, run_child

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def vlora_checkpoint(tmp_path_factory, vlora, vlora_processor):
    path = tmp_path_factory.mktemp("vlora") / "vlora_ckpt"
    vlora.save_pretrained(path)
    vlora_processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def batch(vlora_processor, images):
    return vlora_processor(images=[images[0], images[1]], text=PROMPTS, return_tensors="pt", padding=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                **kwargs)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


def test_saved_checkpoint_loads_every_auto_class_and_generates_without_the_package(
        tmp_path, vlora, vlora_processor, vlora_checkpoint, images):
    paths = []
    for index, image in enumerate(images[:2]):
        paths.append(tmp_path / f"image{index}.png")
        image.save(paths[-1])
    result = run_child(vlora_checkpoint, paths, tmp_path)
    assert result["loaded"] == {
        "AutoConfig": "VLoRAConfig", "AutoImageProcessor": "VLoRAImageProcessor", "AutoModel": "VLoRAModel",
        "AutoModelForCausalLM": "VLoRAForConditionalGeneration",
        "AutoModelForImageTextToText": "VLoRAForConditionalGeneration", "AutoProcessor": "VLoRAProcessor",
    }
    assert not result["imported_package"] and result["module"].startswith("transformers_modules.")
    reloaded_images = [Image.open(path) for path in paths]
    expected = vlora_processor(images=reloaded_images, text=PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        tokens = vlora.generate(**expected, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert result["tokens"] == tokens[:, expected["input_ids"].shape[1]:].tolist()
    assert result["image_seq_length"] == 1


def test_device_map_offload_keeps_the_generator_whole_and_generates_the_same_tokens(
        tmp_path, vlora, vlora_checkpoint, batch):
    model = AutoModelForImageTextToText.from_pretrained(
        vlora_checkpoint, trust_remote_code=True, device_map="auto", max_memory={"cpu": "1800KB"},
        offload_folder=str(tmp_path / "offload"))
    placements = set(model.hf_device_map.values())
    assert "disk" in placements and "cpu" in placements, model.hf_device_map
    for name in model.hf_device_map:
        assert not name.startswith("model.perceptual_weights_generator."), name
        assert not re.search(r"\.layers\.\d+\.", name), name
    assert generate(model, batch) == generate(vlora, batch)


@pytest.mark.skipif(Version(transformers.__version__) < Version("4.54"), reason="bitsandbytes on CPU needs 4.54+")
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_language_model_keeps_the_generator_and_takes_the_deltas(vlora_checkpoint, vlora, batch, bits):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
              if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
    model = VLoRAForConditionalGeneration.from_pretrained(vlora_checkpoint, quantization_config=config).eval()
    quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = name.split(".")[1] if name.startswith("model.") else name
            kinds.setdefault(part, set()).add("quantized" if isinstance(module, quantized) else "plain")
    assert kinds == {"vision_tower": {"plain"}, "perceptual_weights_generator": {"plain"},
                     "language_model": {"quantized"}, "lm_head": {"plain"}}
    with torch.no_grad():
        logits = model(**batch).logits
        # the deltas reach the quantized maps: a text-only run of the same ids differs
        weights = model.get_perceptual_weights(batch["pixel_values"])
        assert weights["q"][0].dtype == torch.float32
        reference = vlora(**batch).logits
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.25 * reference.abs().max()
    assert len(generate(model, batch)[0]) == NEW_TOKENS


def test_peft_lora_on_the_language_model_trains_with_the_deltas_applied_once(vlora, batch):
    peft = pytest.importorskip("peft")
    model = copy.deepcopy(vlora)
    with torch.no_grad():
        reference = model(**batch).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    wrapped = peft.get_peft_model(model, config)
    with torch.no_grad():
        # fresh adapters add nothing: the VLoRA deltas are applied once, to the wrapped maps
        torch.testing.assert_close(wrapped(**batch).logits, reference, rtol=1e-5, atol=1e-5)
    wrapped.train()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = wrapped(**batch, labels=labels).loss
    loss.backward()
    grads = [name for name, param in wrapped.named_parameters() if param.grad is not None]
    assert grads and all("lora_" in name for name in grads)


def test_pipeline_answers_chat_messages(vlora_checkpoint, images):
    pipe = pipeline("image-text-to-text", model=str(vlora_checkpoint), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]},
                                             {"type": "text", "text": "What is in the image?"}]}]
    chat = pipe(text=messages, max_new_tokens=4, return_full_text=False)
    assert isinstance(chat[0]["generated_text"], str)


def test_every_entry_module_names_all_the_modules_it_needs():
    """transformers 4.46 copies into its module cache only the relative imports an entry module names itself, then
    imports the whole chain: a module reached only through another fails to load there."""
    from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

    from modeling_tokenpacker.remote_code import PACKAGE_DIR

    for family in ("tokenpacker", "vlora"):
        for kind in ("configuration", "modeling", "processing", "image_processing"):
            path = PACKAGE_DIR / f"{kind}_{family}.py"
            direct = {name + ".py" for name in get_relative_imports(str(path))}
            closure = {Path(item).name for item in get_relative_import_files(str(path))}
            assert closure == direct, (path.name, sorted(closure - direct))

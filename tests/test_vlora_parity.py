"""Parity with the original VLoRA code: tiny original-format checkpoints (tests/original_vlora_format.py) are
converted and must compute what the original computed on them (tests/fixtures/vlora/, made by running the original
repository: tests/fixtures/README.md says how).

Per variant: identical input ids, pixel values <= 1e-6, every A and B <= 1e-5, logits <= 1e-4 (float32, every row
of the prompt), identical greedy tokens under both position rules (full forwards, and the original `generate`'s),
and a left-padded batch mixing an image prompt and a text-only prompt.
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import original_vlora_format as ov
from conversion.vlora_converter import convert
from modeling_tokenpacker import VLoRAForConditionalGeneration, VLoRAProcessor

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "vlora")
REFERENCE = json.load(open(os.path.join(FIXTURES, "reference.json")))
TENSORS = load_file(os.path.join(FIXTURES, "reference.safetensors"))
VARIANTS = list(REFERENCE["variants"])
ORIGINAL_PLACEHOLDER = REFERENCE["image_token_index"]  # -200


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    return ov.build_all(tmp_path_factory.mktemp("vlora_originals"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, originals):
    """variant -> (model, processor) converted from the original-format checkpoint, in float32 as the original ran for
    the fixtures (the default, the checkpoint's bf16/fp16, would round the float32 CLIP folder's weights); the
    converter's own verification is tests/test_vlora_conversion.py's."""
    root = tmp_path_factory.mktemp("vlora_converted")
    out = {}
    for name in VARIANTS:
        original = originals[name]
        folder = root / name
        if name == "stage1":
            convert(folder, projector_only=os.path.join(original.path, "mm_projector.bin"),
                    base_llm=original.base_llm_path, vision_tower=original.clip_path, dtype="float32", verify=False,
                    progress=False)
        else:
            convert(folder, input=original.path, vision_tower=original.clip_path, dtype="float32", verify=False,
                    progress=False)
        model = VLoRAForConditionalGeneration.from_pretrained(folder, **{"dtype": torch.float32}).eval()
        out[name] = (model, VLoRAProcessor.from_pretrained(folder))
    return out


def our_ids(original_ids, processor):
    return [processor.image_token_id if i == ORIGINAL_PLACEHOLDER else i for i in original_ids]


def prompt_inputs(processor):
    image = ov.make_test_image()
    return processor(images=[image], text=[REFERENCE["provenance"]["prompt"]], return_tensors="pt",
                     image_aspect_ratio="pad")


@pytest.mark.parametrize("name", VARIANTS)
def test_input_ids_and_pixels_equal_the_originals(converted, name):
    _, processor = converted[name]
    inputs = prompt_inputs(processor)
    assert inputs["input_ids"][0].tolist() == our_ids(REFERENCE["input_ids"], processor)
    text = processor(text=[REFERENCE["provenance"]["text_only_prompt"]], return_tensors="pt")
    assert text["input_ids"][0].tolist() == REFERENCE["text_only_input_ids"]
    torch.testing.assert_close(inputs["pixel_values"], TENSORS["pixel_values"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_a_and_b_equal_the_originals(converted, name):
    model, _ = converted[name]
    with torch.no_grad():
        weights = model.get_perceptual_weights(TENSORS["pixel_values"])
    config, pairs = model.config, REFERENCE["variants"][name]["ab_pairs"]
    assert sorted(map(tuple, pairs)) == sorted((layer, letter) for layer in config.patched_layers
                                               for letter in config.delta_targets)
    for layer, letter in pairs:
        slot = config.patched_layers.index(layer)
        factor_a, factor_b = weights[letter]
        torch.testing.assert_close(factor_a[0, slot], TENSORS[f"{name}.A.{layer}.{letter}"], rtol=0, atol=1e-5)
        torch.testing.assert_close(factor_b[slot], TENSORS[f"{name}.B.{layer}.{letter}"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_of_every_prompt_row_equal_the_originals(converted, name):
    model, processor = converted[name]
    with torch.no_grad():
        logits = model(**prompt_inputs(processor)).logits[0]
    torch.testing.assert_close(logits, TENSORS[f"{name}.logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_tokens_equal_the_originals_under_both_position_rules(converted, name):
    model, processor = converted[name]
    reference = REFERENCE["variants"][name]
    inputs = prompt_inputs(processor)
    steps = len(reference["generate"]["tokens"])
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        original = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  generation_positions="original", return_dict_in_generate=True, output_logits=True)
    length = inputs["input_ids"].shape[1]
    assert full[0, length:].tolist() == reference["greedy_full_forward"]["tokens"]
    assert original.sequences[0, length:].tolist() == reference["generate"]["tokens"]
    torch.testing.assert_close(torch.cat(original.logits), TENSORS[f"{name}.generate_logits"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_batch_mixing_an_image_prompt_and_a_text_only_prompt_equals_the_originals(converted, name):
    model, processor = converted[name]
    reference, batch = REFERENCE["variants"][name]["batch"], REFERENCE["batch"]
    prompts = [REFERENCE["provenance"]["prompt"], REFERENCE["provenance"]["text_only_prompt"]]
    inputs = processor(images=[ov.make_test_image()], text=prompts, return_tensors="pt", padding=True,
                       image_aspect_ratio="pad")
    assert inputs["input_ids"].tolist() == [our_ids(row, processor) for row in batch["input_ids"]]
    assert inputs["attention_mask"].tolist() == batch["attention_mask"]
    positions = torch.tensor(batch["position_ids_prefill"])
    steps = len(reference["generate"]["tokens"][0])
    with torch.no_grad():
        logits = model(**inputs, position_ids=positions).logits
        torch.testing.assert_close(logits[:, -8:], TENSORS[f"{name}.batch.logits_last8"], rtol=0, atol=1e-4)
        if f"{name}.batch.logits" in TENSORS:
            valid = inputs["attention_mask"].bool()
            torch.testing.assert_close(logits[valid], TENSORS[f"{name}.batch.logits"][valid], rtol=0, atol=1e-4)
        full = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        original = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                  generation_positions="original")
    length = inputs["input_ids"].shape[1]
    assert full[:, length:].tolist() == reference["greedy_full_forward"]["tokens"]
    assert original[:, length:].tolist() == reference["generate"]["tokens"]

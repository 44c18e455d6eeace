"""VLoRA's config, generator and deltas: the maths of the paper on any causal LM's own modules."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_tokenpacker import VLoRAConfig, VLoRAForConditionalGeneration
from modeling_tokenpacker.demo_vlora import TINY_TEXT_CONFIG, TINY_VISION_CONFIG, build_tiny_vlora_model

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
TEXT_PROMPT = "USER: Describe a cat. ASSISTANT:"


@pytest.fixture(scope="module")
def image_inputs(vlora_processor, images):
    return vlora_processor(images=[images[0]], text=[PROMPT], return_tensors="pt")


def config_with(**kwargs):
    text = {**TINY_TEXT_CONFIG, "vocab_size": 300, **kwargs.pop("text_config", {})}
    settings = {"generator_hidden_size": 32, "generator_num_layers": 1, "lora_rank": 4, "layer_stride": 2, **kwargs}
    return VLoRAConfig(vision_config=TINY_VISION_CONFIG, text_config=text, **settings)


@pytest.mark.parametrize("kwargs, message", [
    ({"layer_stride": 3}, "divisor of the language model's 4 layers"),
    ({"delta_targets": "qx"}, "only hold the letters"),
    ({"delta_targets": "qq"}, "names a letter twice"),
    ({"delta_targets": ""}, "non-empty string"),
    ({"generator_num_heads": 5}, "must divide generator_hidden_size"),
    ({"generation_positions": "cumsum"}, "generation_positions must be one of"),
    ({"vision_feature_layer": 9}, "outside the vision tower's hidden states"),
    ({"image_token_embedding_id": 300}, "image_token_embedding_id must be an id"),
    ({"delta_modules": {"q": None}, "delta_targets": "q"}, None),
    ({"separate_generators": False, "text_config": {"head_dim": 8}}, "shared generator"),
])
def test_config_rejects_settings_the_model_cannot_run(kwargs, message):
    if message is None:  # a None path is the user's override of a known target: accepted, fails when used
        assert config_with(**kwargs).delta_modules["q"] is None
        return
    with pytest.raises(ValueError, match=message):
        config_with(**kwargs)


def test_config_round_trips_and_derives_slots_layers_and_scaling():
    config = config_with(lora_alpha=8, delta_targets="om", layer_stride=4)
    assert config.patched_layers == [3] and config.num_slots == 1 and config.lora_scaling == 2.0
    again = VLoRAConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert config_with().lora_scaling == 1.0 and config_with(layer_stride=1).patched_layers == [0, 1, 2, 3]


def test_generator_gives_per_image_a_and_shared_scaled_b(vlora, image_inputs):
    config = vlora.config
    with torch.no_grad():
        weights = vlora.get_perceptual_weights(torch.cat([image_inputs["pixel_values"]] * 2))
    assert list(weights) == list(config.delta_targets)
    for letter, (factor_a, factor_b) in weights.items():
        size_in, size_out = config.delta_shape(letter)
        assert factor_a.shape == (2, config.num_slots, size_in, config.lora_rank)
        assert factor_b.shape == (config.num_slots, size_out, config.lora_rank)
        torch.testing.assert_close(factor_b, vlora.perceptual_weights_generator.lora_B[letter] * config.lora_scaling)
        torch.testing.assert_close(factor_a[0], factor_a[1])


def test_shared_generator_rows_are_letter_major(tokenizer, image_inputs):
    model = build_tiny_vlora_model(tokenizer, separate_generators=False, delta_targets="qvm")
    generator = model.perceptual_weights_generator
    assert len(generator.generators) == 1 and generator.generators[0].queries.shape[0] == 3 * model.config.num_slots
    with torch.no_grad():
        features = model.model.get_image_features(image_inputs["pixel_values"])
        rows = generator.generators[0](generator.visual_proj(features) + generator.position_embedding)
        weights = generator(features)
    slots, size_in, rank = model.config.num_slots, 64, model.config.lora_rank
    for index, letter in enumerate("qvm"):
        expected = rows[:, index * slots:(index + 1) * slots].reshape(1, slots, size_in, rank)
        torch.testing.assert_close(weights[letter][0], expected, rtol=0, atol=0)


def plain_lm_with_merged_deltas(model, weights, row=0):
    """An independent reference: the language model as a plain `*ForCausalLM` whose q/k/v/o weights have the image's
    deltas merged in (W + B Aᵀ) and whose MLP returns `mlp(x) + x A_m B_mᵀ` through a replaced forward."""
    config = model.config
    plain = AutoModelForCausalLM.from_config(config.text_config)
    state = {f"model.{key}": value for key, value in model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    plain.load_state_dict(state, strict=False)
    for slot, layer_index in enumerate(config.patched_layers):
        layer = plain.model.layers[layer_index]
        for letter, (factor_a, factor_b) in weights.items():
            a, b = factor_a[row, slot], factor_b[slot]
            if letter == "m":
                forward = layer.mlp.forward
                layer.mlp.forward = lambda x, forward=forward, a=a, b=b: forward(x) + x @ a @ b.T
                continue
            linear = layer.get_submodule(config.delta_modules[letter])
            with torch.no_grad():
                linear.weight += b @ a.T
    return plain.eval()


@pytest.mark.parametrize("text_config", [
    {},  # LLaMA
    {"model_type": "qwen2", "num_key_value_heads": 2},  # biased q/k/v, grouped key/value heads
    {"model_type": "mistral", "num_key_value_heads": 2, "sliding_window": None},
], ids=["llama", "qwen2", "mistral"])
def test_deltas_equal_merged_weights_on_each_language_model(tokenizer, vlora_processor, images, text_config):
    model = build_tiny_vlora_model(tokenizer, text_config={**TINY_TEXT_CONFIG, **text_config})
    inputs = vlora_processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
        weights = model.get_perceptual_weights(inputs["pixel_values"])
        reference = plain_lm_with_merged_deltas(model, weights)
        ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id,
                                              model.config.image_token_embedding_id)
        mask = inputs["attention_mask"].masked_fill(inputs["input_ids"] == model.config.image_token_id, 0)
        expected = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    # the deltas matter: without them the logits are another model's
    plain = AutoModelForCausalLM.from_config(model.config.text_config)
    plain.load_state_dict({**{f"model.{k}": v for k, v in model.language_model.state_dict().items()},
                           "lm_head.weight": model.lm_head.weight}, strict=False)
    with torch.no_grad():
        assert (ours - plain.eval()(input_ids=ids, attention_mask=mask).logits).abs().max() > 1e-3


def test_untrained_b_leaves_the_plain_language_model(tokenizer, vlora_processor, images):
    model = build_tiny_vlora_model(tokenizer, b_std=0.0)
    with_image = vlora_processor(images=[images[0]], text=[PROMPT], return_tensors="pt")
    other_image = vlora_processor(images=[images[1]], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**with_image).logits, model(**other_image).logits, rtol=0, atol=0)


def test_text_only_rows_of_a_mixed_batch_get_exactly_the_plain_language_model(vlora, vlora_processor, images):
    batch = vlora_processor(images=[images[0]], text=[PROMPT, TEXT_PROMPT], return_tensors="pt", padding=True,
                            padding_side="right")
    alone = vlora_processor(text=[TEXT_PROMPT], return_tensors="pt")
    length = alone["input_ids"].shape[1]
    ids = batch["input_ids"]
    placeholder = ids == vlora.config.image_token_id
    with torch.no_grad():
        mixed = vlora(**batch).logits
        # the same batch through the language model alone, deltas off (the placeholder masked as the model does)
        hidden = vlora.language_model(input_ids=ids.masked_fill(placeholder, vlora.config.image_token_embedding_id),
                                      attention_mask=batch["attention_mask"].masked_fill(placeholder, 0))
        plain = vlora.lm_head(hidden.last_hidden_state)
        text_only = vlora(**alone).logits[0]
        image_alone = vlora(**vlora_processor(images=[images[0]], text=[PROMPT], return_tensors="pt")).logits[0]
    torch.testing.assert_close(mixed[1], plain[1], rtol=0, atol=0)
    assert (mixed[0] - plain[0]).abs().max() > 1e-3  # the image row does get its deltas
    torch.testing.assert_close(mixed[1, :length], text_only, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed[0, :image_alone.shape[0]], image_alone, rtol=1e-5, atol=1e-5)


def test_the_placeholder_keeps_a_position_and_no_query_attends_to_it(vlora, image_inputs):
    ids = image_inputs["input_ids"]
    column = int((ids[0] == vlora.config.image_token_id).nonzero()[0, 0])
    other = copy.deepcopy(vlora)
    other.config.image_token_embedding_id = 5
    counted = torch.arange(ids.shape[1])[None]
    skipped = torch.cat([counted[:, :column + 1], counted[:, column + 1:] - 1], 1)
    with torch.no_grad():
        reference = vlora(**image_inputs).logits
        # what fills the placeholder cannot reach any other position
        changed = other(**image_inputs).logits
        with_counted = vlora(**image_inputs, position_ids=counted).logits
        with_skipped = vlora(**image_inputs, position_ids=skipped).logits
    torch.testing.assert_close(changed[:, column + 1:], reference[:, column + 1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(changed[:, :column], reference[:, :column], rtol=0, atol=0)
    assert (changed[:, column] - reference[:, column]).abs().max() > 0
    # its position counts, as in the original: positions 0 ... L-1 over the whole prompt
    torch.testing.assert_close(with_counted, reference, rtol=0, atol=0)
    assert (with_skipped[:, column + 1:] - reference[:, column + 1:]).abs().max() > 1e-4
    # the caller's tensors are left as they were
    assert int((image_inputs["input_ids"] == vlora.config.image_token_id).sum()) == 1
    assert bool(image_inputs["attention_mask"].all())


def test_sdpa_and_eager_attention_agree(tokenizer, vlora, image_inputs):
    eager = copy.deepcopy(vlora)
    eager.config.text_config._attn_implementation = "eager"
    eager.language_model.config._attn_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(vlora(**image_inputs).logits, eager(**image_inputs).logits, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, image_inputs):
    def gradients(checkpointing):
        model = build_tiny_vlora_model(tokenizer).train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        labels = image_inputs["input_ids"].clone()
        loss = model(**image_inputs, labels=labels).loss
        loss.backward()
        return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert set(plain) == set(checkpointed)
    assert any(name.startswith("model.perceptual_weights_generator.generators") for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_gradient_checkpointing_is_refused(vlora):
    with pytest.raises(ValueError, match="use_reentrant=False"):
        copy.deepcopy(vlora).gradient_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_model_follows_the_float32_one(vlora, image_inputs, dtype):
    half = copy.deepcopy(vlora).to(dtype)
    with torch.no_grad():
        reference = vlora(**image_inputs).logits
        logits = half(**image_inputs).logits.float()
        weights = half.get_perceptual_weights(image_inputs["pixel_values"])
    assert half.dtype == dtype and weights["q"][0].dtype == dtype
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_labels_never_count_the_placeholder(vlora, image_inputs):
    labels = image_inputs["input_ids"].clone()
    with torch.no_grad():
        loss = vlora(**image_inputs, labels=labels).loss
        masked = labels.masked_fill(labels == vlora.config.image_token_id, -100)
        assert torch.allclose(loss, vlora(**image_inputs, labels=masked).loss)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("change, message", [
    ("two_images", "2 images"),
    ("no_images", "no pixel_values were given"),
    ("two_placeholders", "one image"),
])
def test_images_and_placeholders_that_disagree_are_refused(vlora, image_inputs, change, message):
    inputs = dict(image_inputs)
    if change == "two_images":
        inputs["pixel_values"] = torch.cat([inputs["pixel_values"]] * 2)
    elif change == "no_images":
        inputs.pop("pixel_values")
    else:
        ids = inputs["input_ids"].clone()
        ids[0, 1] = vlora.config.image_token_id
        inputs["input_ids"] = ids
    with pytest.raises(ValueError, match=message):
        vlora(**inputs)


def test_models_of_the_family_save_and_load_with_the_same_outputs(tmp_path, vlora, image_inputs):
    vlora.save_pretrained(tmp_path / "vlora_ckpt")
    loaded = VLoRAForConditionalGeneration.from_pretrained(tmp_path / "vlora_ckpt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**image_inputs).logits, vlora(**image_inputs).logits, rtol=0, atol=0)

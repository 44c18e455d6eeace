"""The model: feature scattering, loss, KV-cached and batched generation, other language models, flags."""

import pytest
import torch

from modeling_tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration, TokenPackerModel
from conftest import dtype_kwargs
from modeling_tokenpacker.demo import build_tiny_model, build_tiny_processor

PROMPTS = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "USER: <image>\nDescribe the image briefly, please. ASSISTANT:",
    "A chat. USER: <image>\nA cat? ASSISTANT:",
]


def single_inputs(processor, image, prompt=PROMPTS[0]):
    return processor(images=[image], text=[prompt], return_tensors="pt")


def greedy_without_cache(model, inputs, steps):
    """Reference decoding: a full forward over the whole sequence for every new token, no cache."""
    input_ids = inputs["input_ids"]
    attention_mask = inputs["attention_mask"]
    for _ in range(steps):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=inputs["pixel_values"],
                       use_cache=False).logits
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_token], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_token)], dim=1)
    return input_ids


def test_image_features_are_packed_to_image_seq_length_tokens(tiny_model, processor, images):
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, features = tiny_model.model.pack_images(pixel_values)
    assert features.shape == (3, 144, tiny_model.config.text_config.hidden_size)
    assert torch.isfinite(features).all()


def test_forward_scatters_features_into_image_positions_and_returns_them(tiny_model, processor, images):
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        output = tiny_model(**inputs)
        _, features = tiny_model.model.pack_images(inputs["pixel_values"])
        embeds = tiny_model.get_input_embeddings()(inputs["input_ids"])
        mask = inputs["input_ids"] == tiny_model.config.image_token_id
        embeds[mask] = features.reshape(-1, features.shape[-1])
        by_embeds = tiny_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(output.image_hidden_states, features)
    torch.testing.assert_close(output.logits, by_embeds.logits, atol=1e-5, rtol=0)
    assert output.logits.shape[:2] == inputs["input_ids"].shape


def test_inputs_embeds_with_pixel_values_equals_input_ids_path(tiny_model, processor, images):
    inputs = single_inputs(processor, images[1])
    with torch.no_grad():
        by_ids = tiny_model(**inputs).logits
        embeds = tiny_model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = tiny_model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"],
                               attention_mask=inputs["attention_mask"]).logits
    torch.testing.assert_close(by_ids, by_embeds, atol=1e-5, rtol=0)


def test_image_token_count_mismatch_raises_with_both_numbers(tiny_model, processor, images):
    inputs = single_inputs(processor, images[0])
    two_images = torch.cat([inputs["pixel_values"], inputs["pixel_values"]])
    with pytest.raises(ValueError, match=r"144 image tokens.*288 features"):
        tiny_model(input_ids=inputs["input_ids"], pixel_values=two_images)


def test_exactly_one_of_input_ids_and_inputs_embeds_is_required(tiny_model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        tiny_model(input_ids=None)


def test_generate_with_kv_cache_equals_recomputation_without_cache(tiny_model, processor, images):
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        cached = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, min_new_tokens=8)
        reference = greedy_without_cache(tiny_model, inputs, steps=8)
    assert cached.tolist() == reference.tolist()


def test_generate_without_cache_gives_the_same_tokens(tiny_model, processor, images):
    inputs = single_inputs(processor, images[2])
    with torch.no_grad():
        cached = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        uncached = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_static_cache_generates_the_same_tokens(tiny_model, processor, images):
    inputs = single_inputs(processor, images[1])
    with torch.no_grad():
        dynamic = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        static = tiny_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                     cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


def test_left_padded_batch_generates_the_same_tokens_as_each_alone(tiny_model, processor, images):
    batch = processor(images=images, text=PROMPTS, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "prompts of different lengths must be left-padded"
    with torch.no_grad():
        together = tiny_model.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        width = batch["input_ids"].shape[1]
        for i, (image, prompt) in enumerate(zip(images, PROMPTS)):
            alone_inputs = single_inputs(processor, image, prompt)
            alone = tiny_model.generate(**alone_inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            new_alone = alone[0, alone_inputs["input_ids"].shape[1]:]
            assert together[i, width:].tolist() == new_alone.tolist()


def test_loss_is_finite_and_ignores_image_positions(tiny_model, processor, images):
    inputs = single_inputs(processor, images[0])
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        output = tiny_model(**inputs, labels=labels)
        scrambled = labels.clone()
        image_positions = labels == tiny_model.config.image_token_id
        scrambled[image_positions] = 5  # any id: image positions must not count
        scrambled_loss = tiny_model(**inputs, labels=scrambled).loss
    assert torch.isfinite(output.loss)
    torch.testing.assert_close(output.loss, scrambled_loss)
    logits = output.logits[0, :-1]
    targets = labels[0, 1:]
    keep = ~image_positions[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(output.loss, expected, atol=1e-5, rtol=0)


def test_training_step_with_gradient_checkpointing_updates_projector_and_language_model(tokenizer, processor, images):
    model = build_tiny_model(tokenizer, seed=3).train()
    model.gradient_checkpointing_enable()
    inputs = single_inputs(processor, images[0])
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert model.model.multi_modal_projector.output_mlp.linear_2.weight.grad.abs().sum() > 0
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.language_model.gradient_checkpointing


def test_qwen2_language_model_works(tokenizer, images):
    qwen = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    model = build_tiny_model(tokenizer, text_config=qwen, scale_factor=3)
    processor = build_tiny_processor(tokenizer, model.config.image_seq_length)
    assert type(model.model.language_model).__name__ == "Qwen2Model"
    assert model.config.image_seq_length == 64
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
        reference = greedy_without_cache(model, inputs, steps=5)
    assert cached.tolist() == reference.tolist()
    assert "Qwen2DecoderLayer" in model._no_split_modules


def test_mlp2x_gelu_baseline_feeds_all_576_patches(tokenizer, images):
    model = build_tiny_model(tokenizer, projector_type="mlp2x_gelu")
    processor = build_tiny_processor(tokenizer, model.config.image_seq_length)
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        output = model(**inputs)
    assert output.image_hidden_states.shape[1] == 576
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 576


def test_base_model_returns_hidden_states_without_lm_head(tiny_model, processor, images):
    base = TokenPackerModel(tiny_model.config)
    base.load_state_dict(tiny_model.model.state_dict())
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        hidden = base(**inputs).last_hidden_state
        logits = tiny_model(**inputs).logits
    torch.testing.assert_close(tiny_model.lm_head(hidden), logits, atol=1e-5, rtol=0)


def test_no_split_modules_keep_blocks_and_projector_whole(tiny_model):
    assert {"TokenPackerProjector", "CLIPEncoderLayer", "LlamaDecoderLayer"} <= set(tiny_model._no_split_modules)


def test_sdpa_and_eager_attention_agree(tmp_path, tiny_model, processor, images):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    inputs = single_inputs(processor, images[0])
    logits = {}
    for implementation in ("sdpa", "eager"):
        model = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "ckpt", attn_implementation=implementation)
        assert model.config.text_config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-4, rtol=0)


def test_bfloat16_model_keeps_float32_interpolation_and_generates(tmp_path, tiny_model, processor, images):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    model = TokenPackerForConditionalGeneration.from_pretrained(tmp_path / "ckpt", **dtype_kwargs(torch.bfloat16))
    assert model.lm_head.weight.dtype == torch.bfloat16
    inputs = single_inputs(processor, images[0])
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert features.dtype == torch.bfloat16
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scale_factor": 5}, "divisor of the vision grid size 24"),
        ({"region_feature_layers": [12, 16, 22, 30]}, r"outside the vision tower's hidden states.*\[-25, 24\]"),
        ({"vision_feature_layer": -26}, "vision_feature_layer contains -26"),
        ({"projector_type": "qformer"}, "projector_type must be one of"),
        ({"vision_feature_select_strategy": "cls"}, "vision_feature_select_strategy must be one of"),
        ({"vision_feature_select_strategy": "full"}, "needs the patch grid without the CLS token"),
        ({"projector_num_heads": 7}, "projector_num_heads must divide projector_hidden_size"),
        ({"image_seq_length": 576}, "contradicts the projector, which gives 144"),
        ({"vision_config": {"hidden_size": 8}}, "needs a `model_type` key"),
        ({"text_config": {"model_type": "not-a-model"}}, "does not know"),
    ],
)
def test_invalid_config_raises_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TokenPackerConfig(**kwargs)


def test_config_round_trips_through_save_pretrained(tmp_path, tiny_model):
    tiny_model.config.save_pretrained(tmp_path)
    loaded = TokenPackerConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == tiny_model.config.to_dict()
    assert type(loaded.vision_config).__name__ == "CLIPVisionConfig"
    assert type(loaded.text_config).__name__ == "LlamaConfig"

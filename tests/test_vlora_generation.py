"""VLoRA generation: the deltas of each image stay in force for every decode step, under both position rules."""

import threading

import pytest
import torch
from transformers import TextIteratorStreamer

from modeling_tokenpacker.demo_vlora import build_tiny_vlora_model

PROMPTS = ["USER: <image>\nWhat is in the image? ASSISTANT:", "USER: <image>\nDescribe the image briefly. ASSISTANT:"]
TEXT_PROMPT = "USER: Describe a cat. ASSISTANT:"
NEW_TOKENS = 6


def generate(model, inputs, **kwargs):
    settings = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
    with torch.no_grad():
        output = model.generate(**inputs, **settings)
    return output[:, inputs["input_ids"].shape[1]:]


def recompute(model, inputs, rule):
    """Greedy tokens by full forwards over the whole sequence, one per step, without a cache. `rule` "original"
    numbers every new token one less (the original `generate`'s positions), "full_forward" as a forward does."""
    ids, pixel_values = inputs["input_ids"], inputs.get("pixel_values")
    length = ids.shape[1]
    has_image = bool((ids == model.config.image_token_id).any())
    for _ in range(NEW_TOKENS):
        positions = torch.arange(ids.shape[1])[None]
        if rule == "original" and has_image:
            positions = torch.where(positions >= length, positions - 1, positions)
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pixel_values, attention_mask=torch.ones_like(ids),
                           position_ids=positions).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[:, length:]


def cache_field(output):
    """(name, value) of the KV cache in a model output: `past_key_values` up to transformers 5.23, `cache` from 5.24."""
    name = "cache" if "cache" in type(output).__dataclass_fields__ else "past_key_values"
    return name, getattr(output, name)


def alone(processor, images, prompt):
    return processor(images=images, text=[prompt], return_tensors="pt")


@pytest.mark.parametrize("rule", ["full_forward", "original"])
def test_greedy_generate_equals_step_by_step_recomputation(vlora, vlora_processor, images, rule):
    inputs = alone(vlora_processor, [images[0]], PROMPTS[0])
    assert generate(vlora, inputs, generation_positions=rule).tolist() == recompute(vlora, inputs, rule).tolist()


def test_the_position_rule_can_be_set_in_the_config(tokenizer, vlora_processor, images):
    model = build_tiny_vlora_model(tokenizer, generation_positions="original")
    inputs = alone(vlora_processor, [images[0]], PROMPTS[0])
    assert generate(model, inputs).tolist() == recompute(model, inputs, "original").tolist()
    with pytest.raises(ValueError, match="generation_positions must be one of"):
        generate(model, inputs, generation_positions="shifted")


@pytest.mark.parametrize("rule", ["full_forward", "original"])
def test_batched_left_padded_generation_equals_each_prompt_alone(vlora, vlora_processor, images, rule):
    prompts = [PROMPTS[0], TEXT_PROMPT, PROMPTS[1]]
    batch = vlora_processor(images=[images[0], images[1]], text=prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"].min() == 0  # the prompts differ in length: some rows are padded
    together = generate(vlora, batch, generation_positions=rule).tolist()
    singles = [generate(vlora, alone(vlora_processor, [images[0]], PROMPTS[0]), generation_positions=rule),
               generate(vlora, alone(vlora_processor, None, TEXT_PROMPT), generation_positions=rule),
               generate(vlora, alone(vlora_processor, [images[1]], PROMPTS[1]), generation_positions=rule)]
    assert together == [single[0].tolist() for single in singles]


def test_each_image_changes_only_its_own_rows(vlora, vlora_processor, images):
    def logits(first_image):
        batch = vlora_processor(images=[first_image, images[1]], text=PROMPTS, return_tensors="pt", padding=True)
        with torch.no_grad():
            return vlora(**batch).logits

    first, swapped = logits(images[0]), logits(images[2])
    torch.testing.assert_close(first[1], swapped[1], rtol=0, atol=0)
    assert (first[0] - swapped[0]).abs().max() > 1e-5


def test_beam_search_and_several_sequences_expand_each_prompts_deltas(vlora, vlora_processor, images):
    batch = vlora_processor(images=[images[0], images[1]], text=PROMPTS, return_tensors="pt", padding=True)
    beams = generate(vlora, batch, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 4
    for row, (image, prompt) in enumerate(zip(images[:2], PROMPTS)):
        single = generate(vlora, alone(vlora_processor, [image], prompt), num_beams=3, num_return_sequences=2)
        assert beams[2 * row:2 * row + 2].tolist() == single.tolist()


def test_the_generator_runs_once_per_image_whatever_the_beams(vlora, vlora_processor, images):
    batch = vlora_processor(images=[images[0]], text=[PROMPTS[0], TEXT_PROMPT], return_tensors="pt", padding=True)
    calls = []
    handle = vlora.perceptual_weights_generator.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        generate(vlora, batch, num_beams=3, num_return_sequences=3)
    finally:
        handle.remove()
    assert calls == [1]


def test_sampling_with_several_sequences_runs_per_prompt(vlora, vlora_processor, images):
    batch = vlora_processor(images=[images[0], images[1]], text=PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    sampled = generate(vlora, batch, do_sample=True, num_return_sequences=3, top_k=5)
    assert sampled.shape == (6, NEW_TOKENS)


def test_generation_without_a_cache_gives_the_same_tokens(vlora, vlora_processor, images):
    batch = vlora_processor(images=[images[0]], text=[PROMPTS[0], TEXT_PROMPT], return_tensors="pt", padding=True)
    assert generate(vlora, batch, use_cache=False).tolist() == generate(vlora, batch).tolist()


def test_a_manual_decode_loop_keeps_the_deltas_in_the_returned_cache(vlora, vlora_processor, images):
    inputs = alone(vlora_processor, [images[0]], PROMPTS[0])
    expected = recompute(vlora, inputs, "full_forward")[0].tolist()
    with torch.no_grad():
        output = vlora(**inputs, use_cache=True)
        name, cache = cache_field(output)
        tokens, mask = [int(output.logits[0, -1].argmax())], inputs["attention_mask"]
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            step = vlora(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, use_cache=True, **{name: cache})
            tokens.append(int(step.logits[0, -1].argmax()))
    assert tokens == expected


def test_a_cache_refuses_inputs_of_another_batch(vlora, vlora_processor, images):
    inputs = alone(vlora_processor, [images[0]], PROMPTS[0])
    with torch.no_grad():
        name, cache = cache_field(vlora(**inputs, use_cache=True))
        with pytest.raises(ValueError, match="perceptual weights of 1 sequences"):
            vlora(input_ids=torch.tensor([[5], [6]]), **{name: cache})
        with pytest.raises(ValueError, match="already holds a sequence with its image"):
            vlora(**alone(vlora_processor, [images[1]], PROMPTS[1]), **{name: cache})


def test_streamers_receive_the_generated_text(vlora, vlora_processor, images):
    inputs = alone(vlora_processor, [images[0]], PROMPTS[0])
    expected = vlora_processor.decode(generate(vlora, inputs)[0], skip_special_tokens=True)
    streamer = TextIteratorStreamer(vlora_processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=vlora.generate, kwargs=kwargs)
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert streamed.strip() == expected.strip() and streamed.strip()

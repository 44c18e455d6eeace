"""VLoRA in the end-to-end benchmark (`end_to_end.py`): the model on the baseline's vision tower and language model,
and its analytic costs (FLOP counts of the perceptual weights generator and of the deltas).

The generator's dims follow the release's proportions (finetune.sh: width D/8, 8 blocks, 16 heads, rank D/64, deltas
on q, k, v, o and m of every 4th layer, one sub-generator per letter); the "7b" size is the release itself.
"""

import torch

from modeling_tokenpacker import VLoRAConfig, VLoRAForConditionalGeneration
from modeling_tokenpacker.demo_vlora import build_tiny_vlora_processor

GENERATOR_SIZES = {
    "quick": {"generator_hidden_size": 32, "generator_num_layers": 1, "lora_rank": 4, "layer_stride": 2},
    "cpu": {"generator_hidden_size": 128, "generator_num_layers": 8, "lora_rank": 16, "layer_stride": 4},
    "7b": {"generator_hidden_size": 512, "generator_num_layers": 8, "lora_rank": 64, "layer_stride": 4},
}


def build_vlora(size, baseline, tokenizer, seed):
    """A VLoRA model whose vision tower, language model and head are the baseline's modules (module objects, so only
    the generator and the deltas differ). Its hooks on the shared language model add nothing outside VLoRA's own
    forward. B is drawn (std 0.02) instead of LoRA's zero, so the deltas are real matrix products."""
    base = baseline.config
    config = VLoRAConfig(
        vision_config=base.vision_config.to_dict(), text_config=base.text_config.to_dict(),
        vision_feature_layer=base.vision_feature_layer, delta_targets="qkvom", separate_generators=True,
        image_token_id=base.image_token_id, image_token_embedding_id=tokenizer.unk_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        **GENERATOR_SIZES[size])
    dtype = next(baseline.parameters()).dtype
    device = next(baseline.parameters()).device
    torch.manual_seed(seed)
    model = VLoRAForConditionalGeneration(config).to(device, dtype).eval()
    with torch.no_grad():
        for factor in model.perceptual_weights_generator.lora_B.values():
            factor.normal_(0, 0.02)
    model.model.vision_tower = baseline.model.vision_tower
    object.__setattr__(model.model, "_vision_tower_model", baseline.model._vision_tower_model)
    model.model.language_model = baseline.model.language_model
    model.lm_head = baseline.lm_head
    return model


def prepare_vlora_inputs(tokenizer, question, image, device, dtype, batch_size=1):
    """`batch_size` copies of the benchmark's chat prompt with one image placeholder each."""
    processor = build_tiny_vlora_processor(tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image] * batch_size, text=[text] * batch_size, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return {key: value.to(device) for key, value in inputs.items()}


def generator_flops(config):
    """Matmul FLOPs (2 per multiply-add) of one image through the generator, as executed: `visual_proj` once; per
    sub-generator and block the queries' self-attention, the cross-attention (whose key/value projections re-project
    all P feature rows), the MLP; each head writes `in * r` values per query."""
    width, rows, ratio = config.generator_hidden_size, config.num_visual_features, config.generator_mlp_ratio
    targets, slots, rank = config.delta_targets, config.num_slots, config.lora_rank
    generators = [(slots, config.delta_shape(letter)[0]) for letter in targets] if config.separate_generators \
        else [(len(targets) * slots, config.delta_shape(targets[0])[0])]
    total = 2 * rows * config.vision_config.hidden_size * width
    for queries, in_features in generators:
        block = (2 * 4 * queries * width * width + 2 * 2 * queries * queries * width  # self-attention
                 + 2 * 2 * queries * width * width + 2 * 2 * rows * width * width  # cross: q/out, k/v over P rows
                 + 2 * 2 * queries * rows * width  # cross-attention scores and values
                 + 2 * 2 * queries * width * ratio * width)  # MLP
        total += config.generator_num_layers * block + 2 * queries * width * in_features * rank
    return total


def delta_flops_per_token(config):
    """FLOPs the deltas add per text token: `(x A) Bᵀ` on every patched map, `2 r (in + out)` each."""
    per_layer = sum(2 * config.lora_rank * sum(config.delta_shape(letter)) for letter in config.delta_targets)
    return len(config.patched_layers) * per_layer


def generator_parameters(model):
    return sum(param.numel() for param in model.perceptual_weights_generator.parameters())


def perceptual_weight_values(config):
    """Values of the per-image state (every A; B is shared by all images)."""
    return len(config.patched_layers) * sum(config.delta_shape(letter)[0] * config.lora_rank
                                            for letter in config.delta_targets)

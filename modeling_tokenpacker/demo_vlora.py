"""Tiny VLoRA checkpoints built offline, for `tokenpacker-demo --family vlora` and the tests. Not shipped inside
checkpoints."""

import torch

# A CLIP-shaped tower with the real 24 x 24 patch grid, and a 4-layer LLaMA, both tiny.
TINY_VISION_CONFIG = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 336, "patch_size": 14,
                      "projection_dim": 32}
TINY_TEXT_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024}


def build_tiny_vlora_model(tokenizer, seed=0, text_config=None, b_std=0.1, **config_kwargs):
    """A random VLoRA model: generator of width 32 and depth 2, rank 4, deltas on q, k, v, o and m of every second
    layer (`config_kwargs` override these). B is drawn with std `b_std` instead of LoRA's zero, so the image changes
    the output. Seconds to build, a few MB."""
    from modeling_tokenpacker import VLoRAConfig, VLoRAForConditionalGeneration

    text_config = {**TINY_TEXT_CONFIG, **(text_config or {}), "vocab_size": len(tokenizer),
                   "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    settings = {"generator_hidden_size": 32, "generator_num_layers": 2, "generator_num_heads": 16, "lora_rank": 4,
                "layer_stride": 2, **config_kwargs}
    config = VLoRAConfig(vision_config=TINY_VISION_CONFIG, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_token_embedding_id=tokenizer.unk_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **settings)
    torch.manual_seed(seed)
    model = VLoRAForConditionalGeneration(config).eval()
    with torch.no_grad():
        for factor in model.perceptual_weights_generator.lora_B.values():
            factor.normal_(0, b_std)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_vlora_processor(tokenizer):
    from modeling_tokenpacker import VLoRAImageProcessor, VLoRAProcessor, load_chat_template

    return VLoRAProcessor(VLoRAImageProcessor(), tokenizer, chat_template=load_chat_template())


def build_vlora_demo_checkpoint(output_dir):
    """Build and save the tiny random VLoRA checkpoint (model, processor, remote code); returns `output_dir`."""
    from .demo import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    build_tiny_vlora_model(tokenizer).save_pretrained(output_dir)
    build_tiny_vlora_processor(tokenizer).save_pretrained(output_dir)
    return output_dir

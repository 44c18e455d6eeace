"""Tiny original-format TokenPacker checkpoints for the converter's tests (test_conversion.py,
test_conversion_faults.py): CLIP of width 64 with the real 24 layers and 24 x 24 grid, projector of width 128, a
2-layer LLaMA with the 1000-piece test tokenizer, in the layouts users have. Random values from seeded torch
generators (parity with the original code uses tests/original_format.py instead)."""

import json
import os
import shutil

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "fixtures", "tokenizer")
VOCAB = 1000
HIDDEN = 64  # LLM
CLIP_WIDTH = 64
EMBED = 128  # projector width (the original: 1024); heads = EMBED // 128 = 1
CLIP_VISION = {
    "model_type": "clip_vision_model", "hidden_size": CLIP_WIDTH, "intermediate_size": 32, "num_hidden_layers": 24,
    "num_attention_heads": 1, "image_size": 336, "patch_size": 14, "projection_dim": 32,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False, "torch_dtype": "float16",
    "use_cache": True, "rope_scaling": None, "pretraining_tp": 1, "transformers_version": "4.31.0",
}


def _randn(generator, *shape, scale=0.1, offset=0.0):
    return torch.randn(*shape, generator=generator) * scale + offset


def clip_state_dict(seed=1):
    """A CLIP vision tower (keys `vision_model.*`, as 4.x saves them) with non-trivial norms and biases."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in CLIP_VISION.items() if k != "model_type"}))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("bias") or "norm" in name:
            tensor = tensor + _randn(generator, *tensor.shape, scale=0.02)
        state["vision_model." + name] = tensor.contiguous()
    return state


def llm_state_dict(seed=2):
    generator = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": _randn(generator, VOCAB, HIDDEN, scale=1.0)}
    for i in range(LLAMA["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{proj}.weight"] = _randn(generator, HIDDEN, HIDDEN, scale=HIDDEN ** -0.5)
        state[p + "mlp.gate_proj.weight"] = _randn(generator, 128, HIDDEN, scale=HIDDEN ** -0.5)
        state[p + "mlp.up_proj.weight"] = _randn(generator, 128, HIDDEN, scale=HIDDEN ** -0.5)
        state[p + "mlp.down_proj.weight"] = _randn(generator, HIDDEN, 128, scale=128 ** -0.5)
        state[p + "input_layernorm.weight"] = _randn(generator, HIDDEN, offset=1.0)
        state[p + "post_attention_layernorm.weight"] = _randn(generator, HIDDEN, offset=1.0)
    state["model.norm.weight"] = _randn(generator, HIDDEN, offset=1.0)
    state["lm_head.weight"] = _randn(generator, VOCAB, HIDDEN, scale=0.5)
    return state


def projector_state_dict(kind="tokenpacker", seed=3):
    g = torch.Generator().manual_seed(seed)
    c, e, h = CLIP_WIDTH, EMBED, HIDDEN
    if kind == "mlp2x_gelu":
        shapes = {"0.weight": (h, c), "0.bias": (h,), "2.weight": (h, h), "2.bias": (h,)}
    else:
        shapes = {"q_proj_1.weight": (e, c), "clip_attn.in_proj_weight": (3 * e, e), "clip_attn.in_proj_bias": (3 * e,),
                  "clip_attn.out_proj.weight": (e, e), "clip_attn.out_proj.bias": (e,), "mlp.0.weight": (h, e),
                  "mlp.0.bias": (h,), "mlp.2.weight": (h, h), "mlp.2.bias": (h,)}
        for kv in ("k_proj_1", "v_proj_1"):
            shapes.update({f"{kv}.0.weight": (e, 4 * c), f"{kv}.0.bias": (e,), f"{kv}.2.weight": (e, e), f"{kv}.2.bias": (e,)})
        for ln in ("ln_q_1", "ln_k_1", "ln_v_1"):
            shapes.update({f"{ln}.weight": (e,), f"{ln}.bias": (e,)})
    state = {}
    for name, shape in sorted(shapes.items()):
        offset = 1.0 if name.startswith("ln_") and name.endswith("weight") else 0.0
        scale = shape[-1] ** -0.5 if len(shape) == 2 else 0.05
        state["model.mm_projector." + name] = _randn(g, *shape, scale=scale, offset=offset)
    return state


def original_config(**overrides):
    config = dict(LLAMA)
    config.update({
        "_name_or_path": "./tiny-vicuna", "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
        "mm_hidden_size": CLIP_WIDTH, "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", "scale_factor": 2,
        "tune_mm_mlp_adapter": False, "use_mm_proj": True, "torch_dtype": "bfloat16",
    })
    config.update(overrides)
    return config


def _write_json(path, data):
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def _copy_tokenizer(folder):
    for name in os.listdir(TOKENIZER_DIR):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), folder)


class Sentinel:
    """Pickles as a call that creates a file: proof of whether a pickle was ever executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _cast(state, dtype):
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def make_clip_folder(path, full_clip_model=False):
    os.makedirs(path)
    state = clip_state_dict()
    config = {k: v for k, v in CLIP_VISION.items()}
    if full_clip_model:  # CLIPModel layout: text tower and projections beside the vision tower
        g = torch.Generator().manual_seed(9)
        state.update({"text_model.embeddings.token_embedding.weight": _randn(g, 50, 16),
                      "text_model.final_layer_norm.weight": _randn(g, 16), "text_projection.weight": _randn(g, 8, 16),
                      "visual_projection.weight": _randn(g, 8, CLIP_WIDTH), "logit_scale": torch.tensor(2.6592),
                      "vision_model.embeddings.position_ids": torch.arange(577).unsqueeze(0)})
        config = {"model_type": "clip", "architectures": ["CLIPModel"], "vision_config": dict(config),
                  "text_config": {"model_type": "clip_text_model", "hidden_size": 16}}
        torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(path, "config.json"), config)
    _write_json(os.path.join(path, "preprocessor_config.json"), {
        "crop_size": 336, "size": 336, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "feature_extractor_type": "CLIPFeatureExtractor"})
    return path


def make_original(path, layout, projector="tokenpacker", config_overrides=None, extra_tensors=None):
    """An original-format checkpoint folder. layout: 'sharded_bin_tower' (bf16, 2 shards + index, tower embedded,
    inv_freq buffers, training_args.bin, trainer_state.json), 'safetensors' (fp32), 'bin_fp16', 'projector_only'
    (bf16 mm_projector.bin + config.json)."""
    os.makedirs(path)
    overrides = {"mm_projector_type": "tokenpacker" if projector == "tokenpacker" else "mlp2x_gelu"}
    overrides.update(config_overrides or {})
    config = original_config(**overrides)
    projector_state = projector_state_dict(projector)
    if layout == "projector_only":
        config["tune_mm_mlp_adapter"] = True
        _write_json(os.path.join(path, "config.json"), config)
        torch.save(_cast(projector_state, torch.bfloat16), os.path.join(path, "mm_projector.bin"))
        return path
    _copy_tokenizer(path)
    state = llm_state_dict()
    state.update(projector_state)
    state.update(extra_tensors or {})
    if layout == "sharded_bin_tower":
        config["torch_dtype"] = "bfloat16"
        head = {k: v for k, v in state.items() if not k.startswith("model.mm_projector") and k != "lm_head.weight"}
        tower = {"model.vision_tower.vision_tower." + k: v for k, v in clip_state_dict().items()}
        tail = {k: v for k, v in state.items() if k not in head}
        inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}
        shards = [_cast({**head, **inv_freq}, torch.bfloat16), _cast({**tower, **tail}, torch.bfloat16)]
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(shard, os.path.join(path, name))
            weight_map.update({k: name for k in shard})
        _write_json(os.path.join(path, "pytorch_model.bin.index.json"), {"metadata": {"total_size": 0}, "weight_map": weight_map})
        torch.save(Sentinel(os.path.join(os.path.dirname(path), "TRAINING_ARGS_WAS_UNPICKLED")),
                   os.path.join(path, "training_args.bin"))
        _write_json(os.path.join(path, "trainer_state.json"), {"global_step": 1})
    elif layout == "safetensors":
        config["torch_dtype"] = "float32"
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    elif layout == "bin_fp16":
        config["torch_dtype"] = "float16"
        torch.save(_cast(state, torch.float16), os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(layout)
    _write_json(os.path.join(path, "config.json"), config)
    return path


def make_base_llm(path):
    os.makedirs(path)
    torch.save(_cast(llm_state_dict(seed=5), torch.float16), os.path.join(path, "pytorch_model.bin"))
    _write_json(os.path.join(path, "config.json"), LLAMA)
    _copy_tokenizer(path)
    return path

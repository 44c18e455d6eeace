"""Deterministic builder of tiny checkpoints in the *original* VLoRA (``llava_vlora``) format.

The folders written here look like what the original VLoRA training (a LLaVA-1.5 fork) writes: the
``config.json`` keys of transformers 4.37.2 plus the ``vlora_*`` keys its training sets, the weight names
of its ``LlavaLlamaVLoRAForCausalLM`` (LLaMA, ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` buffers,
the perceptual weights generator under ``model.mm_projector.*``, the frozen CLIP under
``model.vision_tower.vision_tower.vision_model.*`` in a raw training save), the file layouts and dtypes,
with tiny sizes. ``tests/fixtures/make_vlora_fixtures.py`` runs the original code on exactly these
folders to produce the reference fixtures in ``tests/fixtures/vlora/``; tests rebuild the folders
(bit-identical, see ``original_vlora_digests.file_digests``) and compare.

Every tensor value comes from a PCG64 bit stream seeded by the tensor's name (``numpy`` guarantees
``random_raw`` streams across versions and platforms) turned into floats with exact float64 arithmetic
(the approach of ``tests/original_format.py``). LLaMA and generator values are then rounded to bfloat16
and values below 2**-14 in magnitude flushed to zero, so they are exactly representable in float32,
bfloat16 and float16 and the stored dtype never changes them. The CLIP folder keeps full float32
values, so the bfloat16 copy embedded in a raw training save differs from it, as in real saves (the
original ignores that copy and reads CLIP from ``mm_vision_tower``).

Sizes: CLIP vision tower 336 px, patch 14 (576 patches + CLS), hidden 32, 3 layers, 2 heads, MLP 64,
``mm_vision_select_layer`` -2 (the output of encoder layer 2 of 3), ``patch`` features. LLaMA hidden
64, 4 layers, 4 heads (head dim 16), MLP 128, 4096 positions, vocabulary 1000 (the tiny tokenizer of
``tests/fixtures/tokenizer``). Generator: ``vlora_visual_dim`` 32 (= CLIP width), ``vlora_pos_num``
576, ``vlora_llm_dim`` 64, ``vlora_llm_depth`` 4, rank 4, width ``vlora_dim`` 32 (48 for ``stage1``;
a multiple of 16, the head count the original hard-codes), depth 2.

Initial-value scales (``GENERATOR_STD``): ``queries`` and ``pos_embed`` unit variance (as the original's
init), ``Bs`` std 0.08 (**non-zero**: the original initialises it to zero, which would make every delta
vanish), attention ``in_proj_weight`` 0.25 and ``visual_proj`` 0.2 (so that A depends on the image:
40-80 % relative change for a zero image), other weights 0.05-0.1, biases 0.02, LayerNorm gains
1 + 0.1 z. With these the deltas move the prompt logits by ~1.5 on average (mean |logit| ~3.2) and
every greedy margin of the fixtures is above 0.005.

Layout written under a root folder (the training working directory of the original)::

    root/
      clip-vit-large-patch14-336/   build_clip: CLIPVisionModel folder (float32 model.safetensors,
                                    config.json) + openai's CLIP preprocessor_config.json
      tiny-vicuna/                  build_base_llm: plain LlamaForCausalLM (float16 pytorch_model.bin),
                                    config.json, generation_config.json, tokenizer (slow files)
      checkpoints/vlora-<variant>/  build_original_checkpoint

The checkpoints' ``mm_vision_tower`` is the bare relative name ``clip-vit-large-patch14-336``, as the
original's ``scripts/finetune.sh`` passes it; the original resolves it against the current working
directory, so run it from ``root`` (a converter takes the CLIP folder as an override). Their
``_name_or_path`` is ``tiny-vicuna``.

Variants (``VARIANTS``; s = ``skip_layers``, patched layers i with (i + 1) % s == 0, slot j = i // s):

==================  =====  ==  =====  =====  ==  ======  ============================================
name                type   s   sep    alpha  d   layers  files (dtype)
==================  =====  ==  =====  =====  ==  ======  ============================================
``qkvom_s2_sep``    qkvom  2   true   4      32  1, 3    raw training save (bf16):
                                                         ``model-0000{1,2}-of-00002.safetensors`` +
                                                         ``model.safetensors.index.json``, CLIP
                                                         embedded (``model.vision_tower.vision_tower
                                                         .vision_model.*``), ``inv_freq`` buffers,
                                                         ``trainer_state.json``, ``training_args.bin``
                                                         (a pickled object: never load it)
``qkvo_s1_shared``  qkvo   1   false  null   32  0-3     consolidated ``pytorch_model.bin`` (fp16),
                                                         ``inv_freq`` buffers, no CLIP
``mo_s4_sep``       mo     4   true   8      32  3       ``model.safetensors`` (fp32), no buffers, no
                                                         CLIP; letter order m, o (``gen.0`` is m)
``stage1``          qkvom  2   true   4      48  1, 3    stage 1: ``mm_projector.bin`` (bf16,
                                                         ``torch.save`` of ``{model.mm_projector.*:
                                                         tensor}``) + ``config.json``
                                                         (``tune_mm_mlp_adapter`` true,
                                                         ``image_aspect_ratio`` "square",
                                                         ``torch_dtype`` "float16"); the LLM is
                                                         ``tiny-vicuna``, loaded as the original
                                                         builder does for a ``model_base``
==================  =====  ==  =====  =====  ==  ======  ============================================

Rank 4 and generator depth 2 everywhere; alpha / rank = 1, 1, 2, 1. Each stage-2 variant has its own
LLM and generator values (seeded by the variant name); ``stage1`` uses the base LLM; the CLIP folder is
shared. The stage-2 checkpoints also hold the tokenizer (``tokenizer.model``, a 4.37-style
``tokenizer_config.json`` with ``pad_token`` "<unk>", ``special_tokens_map.json``; no
``tokenizer.json``) and a ``generation_config.json``.
"""

import hashlib
import os
import shutil
from collections import OrderedDict, namedtuple

import numpy as np
import torch

import original_format as _of

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = _of.TOKENIZER_DIR

SEED = 2405_20339
CLIP_FOLDER = "clip-vit-large-patch14-336"
BASE_LLM_FOLDER = "tiny-vicuna"
CHECKPOINTS_FOLDER = "checkpoints"
IMAGE_MEAN = _of.IMAGE_MEAN
IMAGE_STD = _of.IMAGE_STD
CLIP_PREPROCESSOR_CONFIG = dict(_of.CLIP_PREPROCESSOR_CONFIG)
# standard deviations of the generator's weights (``Bs``: non-zero, unlike the original's init)
GENERATOR_STD = {"Bs": 0.08, "visual_proj": 0.2, "in_proj": 0.25, "out_proj": 0.1, "linear1": 0.1, "linear2": 0.05,
                 "weights_head": 0.05}

CLIP_CONFIG = {
    "architectures": ["CLIPVisionModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 32,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 2,
    "num_channels": 3,
    "num_hidden_layers": 3,
    "patch_size": 14,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.31.0",
}

# The base LLM as a Vicuna-7B-v1.5-like folder (saved by transformers 4.31: no rope_theta / attention_bias).
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "use_cache": True,
    "vocab_size": 1000,
}

HEAD_DIM = LLAMA_CONFIG["hidden_size"] // LLAMA_CONFIG["num_attention_heads"]
NUM_PATCHES = (CLIP_CONFIG["image_size"] // CLIP_CONFIG["patch_size"]) ** 2
RANK = 4
GENERATOR_DEPTH = 2

Variant = namedtuple(
    "Variant", "name vlora_type skip_layers weights_sep vlora_alpha vlora_dim vlora_depth vlora_rank layout dtype")
VARIANTS = OrderedDict((v.name, v) for v in (
    Variant("qkvom_s2_sep", "qkvom", 2, True, 4, 32, GENERATOR_DEPTH, RANK, "raw_sharded_safetensors", torch.bfloat16),
    Variant("qkvo_s1_shared", "qkvo", 1, False, None, 32, GENERATOR_DEPTH, RANK, "consolidated_bin", torch.float16),
    Variant("mo_s4_sep", "mo", 4, True, 8, 32, GENERATOR_DEPTH, RANK, "safetensors", torch.float32),
    Variant("stage1", "qkvom", 2, True, 4, 48, GENERATOR_DEPTH, RANK, "mm_projector", torch.bfloat16),
))

OriginalVLoRACheckpoint = namedtuple("OriginalVLoRACheckpoint", "path clip_path base_llm_path variant config")
OriginalVLoRACheckpoint.__doc__ = """Paths of a built original-format VLoRA checkpoint.

path: the checkpoint folder; clip_path: the CLIP folder its ``mm_vision_tower`` names; base_llm_path: the
plain LLaMA folder (``stage1`` only, else None); variant: the variant name; config: the ``config.json``
written (a dict).
"""

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_TOWER_PREFIX = "model.vision_tower.vision_tower."


# --------------------------------------------------------------------------------------------
# deterministic values
# --------------------------------------------------------------------------------------------

def _unit(name, numel):
    """``numel`` float64 values, uniform on [-sqrt(3), sqrt(3)) (unit variance), from the name's stream."""
    digest = hashlib.sha256(f"{SEED}/{name}".encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 32, 4)]
    raw = np.random.PCG64(np.random.SeedSequence(words)).random_raw(numel)
    u = (raw >> np.uint64(11)).astype(np.float64) * (2.0 ** -53)  # exact: 53-bit integers
    return (2.0 * u - 1.0) * 1.7320508075688772


def _tensor(name, shape, kind, std=None):
    """A float32 tensor: kind 'weight' (std*z), 'gain' (1 + 0.1 z) or 'bias' (0.02 z), z unit variance."""
    z = _unit(name, int(np.prod(shape)))
    if kind == "weight":
        x = z * std
    elif kind == "gain":
        x = 1.0 + 0.1 * z
    elif kind == "bias":
        x = 0.02 * z
    else:
        raise ValueError(kind)
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def _specs_to_tensors(salt, specs, exact):
    """Tensors for ``specs`` ({name: (shape, kind, std)}, kept in the given order)."""
    out = OrderedDict()
    for name, (shape, kind, std) in specs.items():
        t = _tensor(f"{salt}/{name}", shape, kind, std)
        out[name] = _of._exact_in_half_types(t) if exact else t
    return out


def inv_freq():
    """The rotary ``inv_freq`` buffer of the original's LLaMA copy, float32 ``[HEAD_DIM // 2]``.

    ``1 / 10000 ** (2k / HEAD_DIM)``, computed in float64 and rounded to float32 (the original computes it in
    float32: the values may differ in the last bit, which no stored dtype here keeps: saves hold it in bf16/fp16).
    """
    k = np.arange(0, HEAD_DIM, 2, dtype=np.float64)
    return torch.from_numpy((1.0 / (10000.0 ** (k / HEAD_DIM))).astype(np.float32))


def clip_state_dict():
    """CLIP vision tower weights (full float32 values), keys ``vision_model.*`` as transformers 4.x saves them."""
    c = CLIP_CONFIG
    d, f, n, p = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["patch_size"]
    specs = OrderedDict([
        ("vision_model.embeddings.class_embedding", ((d,), "weight", 0.5)),
        ("vision_model.embeddings.patch_embedding.weight", ((d, 3, p, p), "weight", (3 * p * p) ** -0.5)),
        ("vision_model.embeddings.position_embedding.weight", ((NUM_PATCHES + 1, d), "weight", 0.2)),
        ("vision_model.pre_layrnorm.weight", ((d,), "gain", None)),
        ("vision_model.pre_layrnorm.bias", ((d,), "bias", None)),
    ])
    for i in range(n):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            specs[pre + f"self_attn.{proj}.weight"] = ((d, d), "weight", d ** -0.5)
            specs[pre + f"self_attn.{proj}.bias"] = ((d,), "bias", None)
        specs[pre + "layer_norm1.weight"] = ((d,), "gain", None)
        specs[pre + "layer_norm1.bias"] = ((d,), "bias", None)
        specs[pre + "mlp.fc1.weight"] = ((f, d), "weight", d ** -0.5)
        specs[pre + "mlp.fc1.bias"] = ((f,), "bias", None)
        specs[pre + "mlp.fc2.weight"] = ((d, f), "weight", f ** -0.5)
        specs[pre + "mlp.fc2.bias"] = ((d,), "bias", None)
        specs[pre + "layer_norm2.weight"] = ((d,), "gain", None)
        specs[pre + "layer_norm2.bias"] = ((d,), "bias", None)
    specs["vision_model.post_layernorm.weight"] = ((d,), "gain", None)
    specs["vision_model.post_layernorm.bias"] = ((d,), "bias", None)
    return _specs_to_tensors("clip", specs, exact=False)


def llm_state_dict(salt, with_inv_freq=False):
    """Tiny LLaMA weights (float32 values exact in bf16/fp16), in the original model's state-dict order.

    ``salt``: a variant name, or "base" for ``tiny-vicuna``. With ``with_inv_freq`` the float32
    ``model.layers.{i}.self_attn.rotary_emb.inv_freq`` buffers are included (after each layer's o_proj).
    ``lm_head.weight`` comes last; the generator (and a raw save's tower) go before it in a full state dict.
    """
    c = LLAMA_CONFIG
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    specs = OrderedDict([("model.embed_tokens.weight", ((v, h), "weight", 1.0))])
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[pre + f"self_attn.{proj}.weight"] = ((h, h), "weight", h ** -0.5)
        specs[pre + "mlp.gate_proj.weight"] = ((f, h), "weight", h ** -0.5)
        specs[pre + "mlp.up_proj.weight"] = ((f, h), "weight", h ** -0.5)
        specs[pre + "mlp.down_proj.weight"] = ((h, f), "weight", f ** -0.5)
        specs[pre + "input_layernorm.weight"] = ((h,), "gain", None)
        specs[pre + "post_attention_layernorm.weight"] = ((h,), "gain", None)
    specs["model.norm.weight"] = ((h,), "gain", None)
    specs["lm_head.weight"] = ((v, h), "weight", 0.5)
    tensors = _specs_to_tensors(f"llm/{salt}", specs, exact=True)
    if not with_inv_freq:
        return tensors
    out = OrderedDict()
    for k, t in tensors.items():
        out[k] = t
        if k.endswith("self_attn.o_proj.weight"):
            out[k.replace("o_proj.weight", "rotary_emb.inv_freq")] = inv_freq()
    return out


def slots(variant):
    """S = vlora_llm_depth // skip_layers: the number of patched layers (slots per letter)."""
    v = VARIANTS[variant]
    depth = LLAMA_CONFIG["num_hidden_layers"]
    if depth % v.skip_layers:
        raise ValueError("skip_layers must divide vlora_llm_depth")
    return depth // v.skip_layers


def patched_layers(variant):
    """The 0-based LLM layers that get deltas: (i + 1) % skip_layers == 0; slot j = i // skip_layers."""
    s = VARIANTS[variant].skip_layers
    return [i for i in range(LLAMA_CONFIG["num_hidden_layers"]) if (i + 1) % s == 0]


def generator_state_dict(variant):
    """The perceptual weights generator of ``variant``, keys ``model.mm_projector.*`` in the original's order.

    Values exact in bf16/fp16. Order as ``LoRAGenerater.state_dict()``: ``pos_embed``, ``Bs``,
    ``visual_proj.*``, then per sub-generator (``gen.{t}.`` per letter when ``weights_sep``, else ``gen.``)
    ``queries``, ``decoders.{n}.*``, ``norm.*``, ``weights_head.*``.
    """
    v = VARIANTS[variant]
    d, n, r = v.vlora_dim, v.vlora_depth, v.vlora_rank
    if d % 16:
        raise ValueError("vlora_dim must be a multiple of the 16 heads the original hard-codes")
    c_dim, dim = CLIP_CONFIG["hidden_size"], LLAMA_CONFIG["hidden_size"]
    t_num, s_num = len(v.vlora_type), slots(variant)
    std = GENERATOR_STD
    specs = OrderedDict([
        ("pos_embed", ((1, NUM_PATCHES, d), "weight", 1.0)),
        ("Bs", ((1, t_num * s_num, dim * r), "weight", std["Bs"])),
        ("visual_proj.weight", ((d, c_dim), "weight", std["visual_proj"])),
        ("visual_proj.bias", ((d,), "bias", None)),
    ])
    prefixes = [f"gen.{t}." for t in range(t_num)] if v.weights_sep else ["gen."]
    k = s_num if v.weights_sep else t_num * s_num
    for pre in prefixes:
        specs[pre + "queries"] = ((1, k, d), "weight", 1.0)
        for i in range(n):
            p = f"{pre}decoders.{i}."
            for att in ("self_attn", "multihead_attn"):
                specs[p + f"{att}.in_proj_weight"] = ((3 * d, d), "weight", std["in_proj"])
                specs[p + f"{att}.in_proj_bias"] = ((3 * d,), "bias", None)
                specs[p + f"{att}.out_proj.weight"] = ((d, d), "weight", std["out_proj"])
                specs[p + f"{att}.out_proj.bias"] = ((d,), "bias", None)
            specs[p + "linear1.weight"] = ((4 * d, d), "weight", std["linear1"])
            specs[p + "linear1.bias"] = ((4 * d,), "bias", None)
            specs[p + "linear2.weight"] = ((d, 4 * d), "weight", std["linear2"])
            specs[p + "linear2.bias"] = ((d,), "bias", None)
            for ln in ("norm1", "norm2", "norm3"):
                specs[p + f"{ln}.weight"] = ((d,), "gain", None)
                specs[p + f"{ln}.bias"] = ((d,), "bias", None)
        specs[pre + "norm.weight"] = ((d,), "gain", None)
        specs[pre + "norm.bias"] = ((d,), "bias", None)
        specs[pre + "weights_head.weight"] = ((dim * r, d), "weight", std["weights_head"])
        specs[pre + "weights_head.bias"] = ((dim * r,), "bias", None)
    tensors = _specs_to_tensors(f"generator/{variant}", specs, exact=True)
    return OrderedDict((f"model.mm_projector.{k}", t) for k, t in tensors.items())


def _layout_has_inv_freq(variant):
    return VARIANTS[variant].layout in ("raw_sharded_safetensors", "consolidated_bin")


def checkpoint_state_dict(variant, include_tower=False):
    """The tensors (float32 values) the files of ``variant`` hold, in the order written.

    Stage 2: LLM (+ ``inv_freq`` buffers for ``qkvom_s2_sep`` / ``qkvo_s1_shared``), generator, ``lm_head``;
    with ``include_tower`` the embedded CLIP (``qkvom_s2_sep`` only: float32 values here, bf16 on disk, so
    rounded when read back). ``stage1``: the generator alone.
    """
    gen = generator_state_dict(variant)
    if VARIANTS[variant].layout == "mm_projector":
        return gen
    llm = llm_state_dict(variant, with_inv_freq=_layout_has_inv_freq(variant))
    head = llm.pop("lm_head.weight")
    out = OrderedDict(llm)
    if include_tower and VARIANTS[variant].layout == "raw_sharded_safetensors":
        out.update((_TOWER_PREFIX + k, t) for k, t in clip_state_dict().items())
    out.update(gen)
    out["lm_head.weight"] = head
    return out


def expected_loaded_state_dict(variant):
    """What the original model holds after loading ``variant`` (LLM incl. ``inv_freq``, generator; float32).

    Loaded ``inv_freq`` buffers are the stored ones read back (bf16/fp16 rounding of ``inv_freq()``) where the
    files hold them, else the model's own fresh value (compare those with a tolerance of 1 ulp).
    """
    v = VARIANTS[variant]
    out = llm_state_dict("base" if v.layout == "mm_projector" else variant, with_inv_freq=True)
    if _layout_has_inv_freq(variant):
        for k in out:
            if k.endswith("rotary_emb.inv_freq"):
                out[k] = out[k].to(v.dtype).to(torch.float32)
    out.update(generator_state_dict(variant))
    return out


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------

def original_config(variant, mm_vision_tower=CLIP_FOLDER):
    """The ``config.json`` dict (keys sorted) the original's training writes for ``variant`` (transformers 4.37.2)."""
    v = VARIANTS[variant]
    stage1 = v.layout == "mm_projector"
    config = {k: val for k, val in LLAMA_CONFIG.items()}
    config.update({
        "_name_or_path": BASE_LLM_FOLDER,
        "architectures": ["LlavaLlamaVLoRAForCausalLM"],
        "model_type": "llava_vlora",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": 10000.0,
        "torch_dtype": LLAMA_CONFIG["torch_dtype"] if stage1 else _DTYPE_NAMES[v.dtype],
        "transformers_version": "4.37.2",
        "use_cache": True,
        # set by the training code
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "square" if stage1 else "pad",
        "mm_hidden_size": CLIP_CONFIG["hidden_size"],
        "mm_projector_lr": None,
        "mm_projector_type": "vlora",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": stage1,
        "tune_vision_tower": False,
        "use_mm_proj": True,
        "vlora_alpha": v.vlora_alpha,
        "vlora_depth": v.vlora_depth,
        "vlora_dim": v.vlora_dim,
        "vlora_llm_depth": LLAMA_CONFIG["num_hidden_layers"],
        "vlora_llm_dim": LLAMA_CONFIG["hidden_size"],
        "vlora_pos_num": NUM_PATCHES,
        "vlora_rank": v.vlora_rank,
        "vlora_type": v.vlora_type,
        "vlora_visual_dim": CLIP_CONFIG["hidden_size"],
        "weights_sep": v.weights_sep,
        "skip_layers": v.skip_layers,
    })
    return dict(sorted(config.items()))


_ADDED = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
CHECKPOINT_TOKENIZER_CONFIG = {  # the slow-tokenizer file a 4.37 fine-tune leaves (pad = unk, 2048)
    "add_bos_token": True,
    "add_eos_token": False,
    "added_tokens_decoder": {str(i): {"content": c, **_ADDED} for i, c in enumerate(("<unk>", "<s>", "</s>"))},
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": "<unk>",
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
    "use_default_system_prompt": False,
}
CHECKPOINT_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------

def _cast(state_dict, dtype):
    return OrderedDict((k, v.to(dtype).clone().contiguous()) for k, v in state_dict.items())


def build_tokenizer(dir, checkpoint_style=False):
    """The tiny LLaMA tokenizer: the committed files (``tiny-vicuna``) or, with ``checkpoint_style``, the
    committed ``tokenizer.model`` with the 4.37-style ``tokenizer_config.json`` / ``special_tokens_map.json``
    of a fine-tuned checkpoint (pad token ``<unk>``). Returns ``dir``."""
    if not checkpoint_style:
        return _of.build_tokenizer(dir)
    os.makedirs(dir, exist_ok=True)
    shutil.copyfile(os.path.join(TOKENIZER_DIR, "tokenizer.model"), os.path.join(dir, "tokenizer.model"))
    _of._write_json(os.path.join(dir, "tokenizer_config.json"), CHECKPOINT_TOKENIZER_CONFIG)
    _of._write_json(os.path.join(dir, "special_tokens_map.json"), CHECKPOINT_SPECIAL_TOKENS_MAP)
    return dir


def build_clip(dir):
    """CLIP vision tower folder (``config.json``, float32 ``model.safetensors``, ``preprocessor_config.json``).

    Hidden 32, 3 layers, 2 heads, MLP 64, 336 px, patch 14, keys ``vision_model.*``. Skips an existing folder.
    """

    def write(tmp):
        _of._save_safetensors(clip_state_dict(), os.path.join(tmp, "model.safetensors"))
        _of._write_json(os.path.join(tmp, "config.json"), CLIP_CONFIG)
        _of._write_json(os.path.join(tmp, "preprocessor_config.json"), CLIP_PREPROCESSOR_CONFIG)

    return _of._atomic_folder(dir, write)


def build_base_llm(dir):
    """Plain LlamaForCausalLM folder: float16 ``pytorch_model.bin`` (no buffers), configs, tokenizer."""

    def write(tmp):
        torch.save(_cast(llm_state_dict("base"), torch.float16), os.path.join(tmp, "pytorch_model.bin"))
        _of._write_json(os.path.join(tmp, "config.json"), LLAMA_CONFIG)
        _of._write_json(os.path.join(tmp, "generation_config.json"),
                        {**GENERATION_CONFIG, "transformers_version": "4.31.0"})
        build_tokenizer(tmp)

    return _of._atomic_folder(dir, write)


def checkpoint_folder(variant):
    return f"vlora-{variant}"


def build_original_checkpoint(root, variant):
    """Build the original-format checkpoint ``variant`` (a key of ``VARIANTS``) under ``root``.

    Also builds ``root/clip-vit-large-patch14-336`` (and ``root/tiny-vicuna`` for ``stage1``) when missing.
    Folders already present are kept as they are. Returns an ``OriginalVLoRACheckpoint``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    v = VARIANTS[variant]
    clip_path = build_clip(os.path.join(root, CLIP_FOLDER))
    base_llm_path = build_base_llm(os.path.join(root, BASE_LLM_FOLDER)) if v.layout == "mm_projector" else None
    path = os.path.join(root, CHECKPOINTS_FOLDER, checkpoint_folder(variant))
    config = original_config(variant)

    def write(tmp):
        _of._write_json(os.path.join(tmp, "config.json"), config)
        if v.layout == "mm_projector":
            torch.save(_cast(generator_state_dict(variant), v.dtype), os.path.join(tmp, "mm_projector.bin"))
            return
        build_tokenizer(tmp, checkpoint_style=True)
        _of._write_json(os.path.join(tmp, "generation_config.json"),
                        {**GENERATION_CONFIG, "transformers_version": "4.37.2"})
        sd = _cast(checkpoint_state_dict(variant, include_tower=True), v.dtype)
        if v.layout == "raw_sharded_safetensors":
            _of._write_sharded(sd, tmp, "safetensors")
            with open(os.path.join(tmp, "training_args.bin"), "wb") as fh:
                fh.write(_of._training_args_pickle(output_dir="./checkpoints/" + checkpoint_folder(variant),
                                                   bf16=True, group_by_modality_length=True))
            _of._write_json(os.path.join(tmp, "trainer_state.json"),
                            {"epoch": 1.0, "global_step": 1, "log_history": [], "max_steps": 1})
        elif v.layout == "consolidated_bin":
            torch.save(sd, os.path.join(tmp, "pytorch_model.bin"))
        elif v.layout == "safetensors":
            _of._save_safetensors(sd, os.path.join(tmp, "model.safetensors"))
        else:
            raise AssertionError(v.layout)

    _of._atomic_folder(path, write)
    return OriginalVLoRACheckpoint(path, clip_path, base_llm_path, variant, config)


def build_all(root, variants=None):
    """Build every variant (or the given ones) under ``root``; returns ``{variant: OriginalVLoRACheckpoint}``."""
    return OrderedDict((name, build_original_checkpoint(root, name)) for name in (variants or VARIANTS))


# --------------------------------------------------------------------------------------------
# the test image
# --------------------------------------------------------------------------------------------

IMAGE_SPEC = {"function": "tests/original_format.py make_image", "width": 400, "height": 300, "variant": 0}


def make_test_image():
    """The fixtures' image: ``original_format.make_image(400, 300, variant=0)`` (RGB, integer arithmetic only)."""
    return _of.make_image(IMAGE_SPEC["width"], IMAGE_SPEC["height"], variant=IMAGE_SPEC["variant"])


def image_digest(image):
    """sha256 of an image's mode, size and raw pixel bytes."""
    return hashlib.sha256(f"{image.mode}|{image.size}|".encode() + image.tobytes()).hexdigest()


"""Deterministic builder of tiny checkpoints in the *original* TokenPacker (LLaVA-1.5) format.

The folders written here look like what the original repository's training writes (config keys,
weight names, file layouts, dtypes), with tiny sizes, so that the converter and the parity tests can
run without downloads. ``tests/fixtures/make_fixtures.py`` runs the original code on exactly these
folders to produce the committed reference fixtures; tests rebuild the folders (bit-identical) and
compare.

Every tensor value comes from a PCG64 bit stream seeded by the tensor's name (``numpy`` guarantees
``random_raw`` streams across versions and platforms) turned into floats with exact or correctly
rounded float64 arithmetic only (no ``torch`` random generator, no ``transformers`` init functions,
no transcendental functions), so the values are identical on any machine and library version.

Widths the original hard-codes are kept: CLIP hidden size 1024 (24 layers, as the multi-level
features read layers 12, 16, 22 and 23), projector width 1024, multi-level width 4096. Everything
else is tiny (CLIP MLP width 64, a 2-layer LLaMA of width 64, a 1000-piece tokenizer).

Layout written under a root folder (the training working directory of the original)::

    root/
      clip-vit-large-patch14-336/     build_clip: CLIPVisionModel folder + CLIP preprocessor config
      tiny-vicuna/                    build_base_llm: plain LlamaForCausalLM (fp16 .bin) + tokenizer
      checkpoints/llava-tokenpacker-<variant>/   build_original_checkpoint

The checkpoints' ``mm_vision_tower`` is ``./clip-vit-large-patch14-336``, relative to ``root`` as
the original training scripts write it: the original resolves it against the current working
directory, so run it from ``root`` (a converter takes the CLIP folder as an override).

Variants (``VARIANTS``):

===============  =====  ======  ===========================================================  =========
name             scale  mode    files                                                        dtype
===============  =====  ======  ===========================================================  =========
s2               2      pad     ``pytorch_model-0000{1,2}-of-00002.bin`` + index, CLIP tower   bfloat16
                                embedded under ``model.vision_tower.vision_tower.*``, old
                                ``rotary_emb.inv_freq`` buffers, ``trainer_state.json``,
                                ``training_args.bin`` (pickled object; never load it)
s3               3      pad     ``model.safetensors``                                          float32
s4               4      pad     ``pytorch_model.bin``                                          float16
projector_only   2      square  stage 1: ``mm_projector.bin`` (``model.mm_projector.*``) +    bfloat16
                                ``config.json``; LLM from ``tiny-vicuna``
hd9              2      slice   ``model-0000{1,2}-of-00002.safetensors`` + index,              bfloat16
                                ``patch_num`` 9
===============  =====  ======  ===========================================================  =========

LLaMA and projector values are rounded to bfloat16 and values below 2**-14 in magnitude flushed to
zero, so they are exactly representable in float32, bfloat16 and float16: the stored dtype never
changes them (the original casts a stage-1 projector to float16 when it loads it). The CLIP folder
keeps full float32 values, so the embedded bfloat16 copy in ``s2`` differs from it, as in real
training saves. Each variant has its own LLM and projector values (seeded by variant name); the
CLIP weights are shared.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections import namedtuple

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(HERE, "fixtures", "tokenizer")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

SEED = 2407_02392
CLIP_FOLDER = "clip-vit-large-patch14-336"
BASE_LLM_FOLDER = "tiny-vicuna"
CHECKPOINTS_FOLDER = "checkpoints"
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

CLIP_CONFIG = {
    "architectures": ["CLIPVisionModel"],
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 1024,
    "image_size": 336,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model",
    "num_attention_heads": 16,
    "num_channels": 3,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.31.0",
}

# The openai/clip-vit-large-patch14-336 file, legacy integer sizes included.
CLIP_PREPROCESSOR_CONFIG = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": IMAGE_MEAN,
    "image_std": IMAGE_STD,
    "resample": 3,
    "size": 336,
}

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
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

Variant = namedtuple("Variant", "name scale_factor image_aspect_ratio layout dtype extra")
VARIANTS = {
    "s2": Variant("s2", 2, "pad", "sharded_bin_with_tower", torch.bfloat16, {}),
    "s3": Variant("s3", 3, "pad", "safetensors", torch.float32, {}),
    "s4": Variant("s4", 4, "pad", "bin", torch.float16, {}),
    "projector_only": Variant("projector_only", 2, "square", "mm_projector", torch.bfloat16, {}),
    "hd9": Variant("hd9", 2, "slice", "sharded_safetensors", torch.bfloat16, {"patch_num": 9}),
}

OriginalCheckpoint = namedtuple("OriginalCheckpoint", "path clip_path base_llm_path variant config")
OriginalCheckpoint.__doc__ = """Paths of a built original-format checkpoint.

path: the checkpoint folder; clip_path: the CLIP folder its ``mm_vision_tower`` points to;
base_llm_path: the plain LLaMA folder (only for ``projector_only``, else None); variant: the
variant name; config: the ``config.json`` written (a dict).
"""

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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
    numel = int(np.prod(shape))
    z = _unit(name, numel)
    if kind == "weight":
        x = z * std
    elif kind == "gain":
        x = 1.0 + 0.1 * z
    elif kind == "bias":
        x = 0.02 * z
    else:
        raise ValueError(kind)
    return torch.from_numpy(x.astype(np.float32).reshape(shape))


def _exact_in_half_types(t):
    """Round to bfloat16 and flush |x| < 2**-14 to zero: then float32, bfloat16 and float16 hold it exactly."""
    t = t.to(torch.bfloat16).to(torch.float32)
    return torch.where(t.abs() < 2.0 ** -14, torch.zeros_like(t), t)


def _specs_to_tensors(salt, specs, exact):
    out = {}
    for name in sorted(specs):
        shape, kind, std = specs[name]
        t = _tensor(f"{salt}/{name}", shape, kind, std)
        out[name] = _exact_in_half_types(t) if exact else t
    return out


def clip_state_dict():
    """CLIP vision tower weights (float32), keys ``vision_model.*`` as transformers 4.x saves them."""
    c = CLIP_CONFIG
    d, f, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    p = c["patch_size"]
    positions = (c["image_size"] // p) ** 2 + 1
    specs = {
        "vision_model.embeddings.class_embedding": ((d,), "weight", 0.5),
        "vision_model.embeddings.patch_embedding.weight": ((d, 3, p, p), "weight", (3 * p * p) ** -0.5),
        "vision_model.embeddings.position_embedding.weight": ((positions, d), "weight", 0.2),
        "vision_model.pre_layrnorm.weight": ((d,), "gain", None),
        "vision_model.pre_layrnorm.bias": ((d,), "bias", None),
        "vision_model.post_layernorm.weight": ((d,), "gain", None),
        "vision_model.post_layernorm.bias": ((d,), "bias", None),
    }
    for i in range(n):
        pre = f"vision_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs[pre + f"self_attn.{proj}.weight"] = ((d, d), "weight", d ** -0.5)
            specs[pre + f"self_attn.{proj}.bias"] = ((d,), "bias", None)
        for ln in ("layer_norm1", "layer_norm2"):
            specs[pre + f"{ln}.weight"] = ((d,), "gain", None)
            specs[pre + f"{ln}.bias"] = ((d,), "bias", None)
        specs[pre + "mlp.fc1.weight"] = ((f, d), "weight", d ** -0.5)
        specs[pre + "mlp.fc1.bias"] = ((f,), "bias", None)
        specs[pre + "mlp.fc2.weight"] = ((d, f), "weight", f ** -0.5)
        specs[pre + "mlp.fc2.bias"] = ((d,), "bias", None)
    return _specs_to_tensors("clip", specs, exact=False)


def llm_state_dict(salt):
    """Tiny LLaMA weights (float32 values exact in bf16/fp16), keys as LlamaForCausalLM saves them."""
    c = LLAMA_CONFIG
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    specs = {
        "model.embed_tokens.weight": ((v, h), "weight", 1.0),
        "model.norm.weight": ((h,), "gain", None),
        "lm_head.weight": ((v, h), "weight", 0.5),
    }
    for i in range(c["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs[pre + f"self_attn.{proj}.weight"] = ((h, h), "weight", h ** -0.5)
        specs[pre + "mlp.gate_proj.weight"] = ((f, h), "weight", h ** -0.5)
        specs[pre + "mlp.up_proj.weight"] = ((f, h), "weight", h ** -0.5)
        specs[pre + "mlp.down_proj.weight"] = ((h, f), "weight", f ** -0.5)
        specs[pre + "input_layernorm.weight"] = ((h,), "gain", None)
        specs[pre + "post_attention_layernorm.weight"] = ((h,), "gain", None)
    return _specs_to_tensors(f"llm/{salt}", specs, exact=True)


def projector_state_dict(salt, hidden_size=LLAMA_CONFIG["hidden_size"]):
    """The 23 TokenPacker projector tensors, keys ``model.mm_projector.*`` (values exact in bf16/fp16)."""
    e, c4, h = 1024, 4096, hidden_size
    specs = {
        "q_proj_1.weight": ((e, e), "weight", e ** -0.5),
        "clip_attn.in_proj_weight": ((3 * e, e), "weight", e ** -0.5),
        "clip_attn.in_proj_bias": ((3 * e,), "bias", None),
        "clip_attn.out_proj.weight": ((e, e), "weight", e ** -0.5),
        "clip_attn.out_proj.bias": ((e,), "bias", None),
        "mlp.0.weight": ((h, e), "weight", e ** -0.5),
        "mlp.0.bias": ((h,), "bias", None),
        "mlp.2.weight": ((h, h), "weight", 3.0 * h ** -0.5),
        "mlp.2.bias": ((h,), "bias", None),
    }
    for kv in ("k_proj_1", "v_proj_1"):
        specs[f"{kv}.0.weight"] = ((e, c4), "weight", c4 ** -0.5)
        specs[f"{kv}.0.bias"] = ((e,), "bias", None)
        specs[f"{kv}.2.weight"] = ((e, e), "weight", e ** -0.5)
        specs[f"{kv}.2.bias"] = ((e,), "bias", None)
    for ln in ("ln_q_1", "ln_k_1", "ln_v_1"):
        specs[f"{ln}.weight"] = ((e,), "gain", None)
        specs[f"{ln}.bias"] = ((e,), "bias", None)
    tensors = _specs_to_tensors(f"projector/{salt}", specs, exact=True)
    return {f"model.mm_projector.{k}": t for k, t in tensors.items()}


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------

def _write_json(path, obj):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")


def _cast(state_dict, dtype):
    return {k: v.to(dtype).clone().contiguous() for k, v in state_dict.items()}


def _save_safetensors(tensors, path):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})


def _two_shards(state_dict):
    """Split in state-dict order where half the bytes are reached (as size-based sharding does)."""
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    first, second, seen = {}, {}, 0
    for k, t in state_dict.items():
        (first if seen < total / 2 else second)[k] = t
        seen += t.numel() * t.element_size()
    return [first, second], total


def _write_sharded(state_dict, folder, fmt):
    shards, total = _two_shards(state_dict)
    if fmt == "bin":
        names = [f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin" for i in range(len(shards))]
        index = "pytorch_model.bin.index.json"
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        index = "model.safetensors.index.json"
    weight_map = {}
    for name, shard in zip(names, shards):
        if fmt == "bin":
            torch.save(shard, os.path.join(folder, name))
        else:
            _save_safetensors(shard, os.path.join(folder, name))
        weight_map.update({k: name for k in shard})
    _write_json(os.path.join(folder, index), {"metadata": {"total_size": total}, "weight_map": weight_map})


def _training_args_pickle(**fields):
    """Pickle bytes of a ``transformers.training_args.TrainingArguments`` object with ``fields`` (str/bool).

    Stands for the ``training_args.bin`` a HF Trainer leaves in its output folder: unpickling it imports
    and builds an arbitrary object, so a converter must never load it. Written opcode by opcode so the
    bytes do not depend on how this module was imported.
    """
    import struct

    def text(value):
        data = value.encode()
        return b"X" + struct.pack("<I", len(data)) + data

    out = b"\x80\x02ctransformers.training_args\nTrainingArguments\n)\x81}("
    for key, value in sorted(fields.items()):
        out += text(key) + (text(value) if isinstance(value, str) else (b"\x88" if value else b"\x89"))
    return out + b"ub."


def _atomic_folder(path, write):
    """Write a folder through a temporary sibling and rename it, so an interrupted build leaves nothing."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=parent)
    try:
        write(tmp)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------

def build_tokenizer(dir):
    """Copy the committed tiny LLaMA tokenizer (``tokenizer.model`` + slow-tokenizer JSONs) into ``dir``.

    Returns ``dir``. Load it with ``LlamaTokenizer``/``LlamaTokenizerFast`` (1000 pieces, ``<unk>``=0,
    ``<s>``=1, ``</s>``=2, byte pieces at 3…258, pad token ``<unk>``).
    """
    os.makedirs(dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(dir, name))
    return dir


def build_clip(dir):
    """Write the CLIP vision tower folder: ``config.json``, ``model.safetensors``, ``preprocessor_config.json``.

    CLIPVisionModel format (keys ``vision_model.*``, float32), hidden 1024, 24 layers, 16 heads, MLP 64,
    336 px, patch 14; preprocessor = openai's CLIP processor file. Returns ``dir``. Skips an existing folder.
    """

    def write(tmp):
        _save_safetensors(clip_state_dict(), os.path.join(tmp, "model.safetensors"))
        _write_json(os.path.join(tmp, "config.json"), CLIP_CONFIG)
        _write_json(os.path.join(tmp, "preprocessor_config.json"), CLIP_PREPROCESSOR_CONFIG)

    return _atomic_folder(dir, write)


def build_base_llm(dir):
    """Plain LlamaForCausalLM folder (fp16 ``pytorch_model.bin``, ``config.json``, tokenizer). Returns ``dir``."""

    def write(tmp):
        torch.save(_cast(llm_state_dict("base"), torch.float16), os.path.join(tmp, "pytorch_model.bin"))
        _write_json(os.path.join(tmp, "config.json"), LLAMA_CONFIG)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"})
        build_tokenizer(tmp)

    return _atomic_folder(dir, write)


def original_config(variant, mm_vision_tower="./" + CLIP_FOLDER):
    """The ``config.json`` dict the original's training writes for ``variant``."""
    v = VARIANTS[variant]
    config = dict(LLAMA_CONFIG)
    config.update({
        "_name_or_path": "./" + BASE_LLM_FOLDER,
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": v.image_aspect_ratio,
        "image_grid_pinpoints": None,
        "mm_hidden_size": 1024,
        "mm_projector_lr": None,
        "mm_projector_type": "tokenpacker",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower,
        "scale_factor": v.scale_factor,
        "torch_dtype": _DTYPE_NAMES[v.dtype] if variant != "projector_only" else LLAMA_CONFIG["torch_dtype"],
        "tune_mm_mlp_adapter": variant == "projector_only",
        "use_cache": True,
        "use_mm_proj": True,
    })
    config.update(v.extra)
    return dict(sorted(config.items()))


def checkpoint_state_dict(variant):
    """The state dict (float32 values) of ``variant`` as its files hold it, embedded tower excluded."""
    sd = llm_state_dict(variant)
    sd.update(projector_state_dict(variant))
    # the order LlavaLlamaForCausalLM.state_dict() has: embed, layers, norm, (vision tower), projector, lm_head
    order = lambda k: (k == "lm_head.weight", "mm_projector" in k, k)  # noqa: E731
    return {k: sd[k] for k in sorted(sd, key=order)}


def build_original_checkpoint(root, variant):
    """Build the original-format checkpoint ``variant`` (a key of ``VARIANTS``) under ``root``.

    Also builds ``root/clip-vit-large-patch14-336`` (and ``root/tiny-vicuna`` for ``projector_only``)
    when missing. Folders already present are kept as they are. Returns an ``OriginalCheckpoint``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    v = VARIANTS[variant]
    clip_path = build_clip(os.path.join(root, CLIP_FOLDER))
    base_llm_path = build_base_llm(os.path.join(root, BASE_LLM_FOLDER)) if variant == "projector_only" else None
    name = "llava-tokenpacker-pretrain" if variant == "projector_only" else f"llava-tokenpacker-{variant}"
    path = os.path.join(root, CHECKPOINTS_FOLDER, name)
    config = original_config(variant)

    def write(tmp):
        _write_json(os.path.join(tmp, "config.json"), config)
        if v.layout == "mm_projector":
            torch.save(_cast(projector_state_dict(variant), v.dtype), os.path.join(tmp, "mm_projector.bin"))
            return
        build_tokenizer(tmp)
        _write_json(os.path.join(tmp, "generation_config.json"),
                    {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "transformers_version": "4.31.0"})
        sd = checkpoint_state_dict(variant)
        if v.layout == "sharded_bin_with_tower":
            head = {k: t for k, t in sd.items() if "mm_projector" not in k and k != "lm_head.weight"}
            inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
            for i in range(LLAMA_CONFIG["num_hidden_layers"]):
                head[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
            tower = {f"model.vision_tower.vision_tower.{k}": t for k, t in clip_state_dict().items()}
            tail = {k: t for k, t in sd.items() if k not in head}
            full = _cast({**head, **tower, **tail}, v.dtype)
            for k in full:
                if k.endswith("rotary_emb.inv_freq"):
                    full[k] = inv_freq.clone()  # buffers stayed float32
            _write_sharded(full, tmp, "bin")
            with open(os.path.join(tmp, "training_args.bin"), "wb") as fh:
                fh.write(_training_args_pickle(output_dir="./checkpoints/" + name, bf16=True, group_by_modality_length=True))
            _write_json(os.path.join(tmp, "trainer_state.json"),
                        {"epoch": 1.0, "global_step": 1, "log_history": [], "max_steps": 1})
        elif v.layout == "safetensors":
            _save_safetensors(_cast(sd, v.dtype), os.path.join(tmp, "model.safetensors"))
        elif v.layout == "bin":
            torch.save(_cast(sd, v.dtype), os.path.join(tmp, "pytorch_model.bin"))
        elif v.layout == "sharded_safetensors":
            _write_sharded(_cast(sd, v.dtype), tmp, "safetensors")
        else:
            raise AssertionError(v.layout)

    _atomic_folder(path, write)
    return OriginalCheckpoint(path, clip_path, base_llm_path, variant, config)


def build_projector_only(root):
    """Stage-1 checkpoint: ``mm_projector.bin`` (bf16) + ``config.json``; see ``build_original_checkpoint``."""
    return build_original_checkpoint(root, "projector_only")


def build_all(root, variants=None):
    """Build every variant (or the given ones) under ``root``; returns ``{variant: OriginalCheckpoint}``."""
    return {name: build_original_checkpoint(root, name) for name in (variants or VARIANTS)}


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

IMAGE_SIZES = {  # name: (width, height)
    "wide": (400, 300),
    "tall": (300, 451),
    "square": (336, 336),
    "hd_wide": (1000, 400),
    "hd_tall": (400, 1000),
    "hd_square": (700, 700),
}


def make_image(width, height, variant=0):
    """A deterministic RGB image: gradients, a checkerboard, a disc and a frame (integer arithmetic only)."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * 255) // max(width - 1, 1)
    g = (y * 255) // max(height - 1, 1)
    b = (((x // 23) + (y // 17) + variant) % 2) * 160 + ((x + 2 * y) * 7 % 64)
    cx, cy, rad = (width * 2) // 5, (height * 3) // 5, min(width, height) // 4
    disc = (x - cx) ** 2 + (y - cy) ** 2 < rad * rad
    r = np.where(disc, 255 - r // 3, r)
    g = np.where(disc, 40 + (variant * 50) % 200, g)
    frame = (x < 6) | (y < 6) | (x >= width - 6) | (y >= height - 6)
    rgb = np.stack([r, g, b], axis=-1)
    rgb = np.where(frame[..., None], np.array([250, 250, 30]), rgb)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def make_images():
    """``{name: PIL.Image}`` for ``IMAGE_SIZES``: 'wide' 400x300, 'tall' 300x451, 'square' 336x336
    (pad and square modes), 'hd_wide' 1000x400, 'hd_tall' 400x1000, 'hd_square' 700x700 (slice mode)."""
    return {name: make_image(w, h, variant=i) for i, (name, (w, h)) in enumerate(IMAGE_SIZES.items())}

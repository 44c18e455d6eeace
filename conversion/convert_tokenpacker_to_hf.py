"""Convert an original TokenPacker (LLaVA-1.5 fork) checkpoint to the 🤗 transformers TokenPacker format.

    python conversion/convert_tokenpacker_to_hf.py --input ORIG_DIR --output OUT_DIR \
        [--vision-tower CLIP_DIR] [--tokenizer DIR] [--dtype float16|bfloat16|float32] \
        [--max-shard-size 5GB] [--overwrite] [--push-to-hub REPO_ID [--private]] [--no-verify] [--preset NAME]
    python conversion/convert_tokenpacker_to_hf.py --projector-only mm_projector.bin \
        --base-llm LLM_DIR --vision-tower CLIP_DIR --output OUT_DIR ...

The output folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`. Weights
are streamed one source shard at a time; every source tensor is mapped (see `conversion/README.md`) or on the
documented ignore list, and an unknown tensor name is an error. The output is written to a temporary sibling folder
and renamed into place only when complete (and, by default, verified bit for bit in a fresh process).

This module must not import `modeling_tokenpacker` at import time: the verification child imports it (for the
mapping) while loading the converted checkpoint through its own remote code only.
"""

import argparse
import datetime
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python conversion/convert_tokenpacker_to_hf.py`
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from conversion import CONVERTER_VERSION  # noqa: E402

logger = logging.getLogger("tokenpacker.conversion")

PRESET_DIR = REPO_ROOT / "configuration"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
VOCAB_MULTIPLE = 64
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
DEFAULT_REGION_FEATURE_LAYERS = [12, 16, 22, 23]  # hard-coded in the original (multi-level CLIP features)

# ------------------------------------------------------------------------------------------------------------------
# config keys of the original config.json
# ------------------------------------------------------------------------------------------------------------------

# LLaMA keys: they become `text_config` (vocab size and special-token ids are replaced by the converter's).
LLAMA_CONFIG_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "pretraining_tp", "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters",
    "attention_bias", "attention_dropout", "mlp_bias", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id",
)
# Multimodal keys the converter reads (and checks).
LLAVA_CONFIG_KEYS = (
    "mm_vision_tower", "mm_hidden_size", "mm_vision_select_layer", "mm_vision_select_feature",
    "mm_projector_type", "scale_factor", "image_aspect_ratio", "patch_num", "mm_use_im_start_end",
    "mm_use_im_patch_token",
)
# Keys that carry nothing the converted model needs (training leftovers, metadata); documented in the README.
IGNORED_CONFIG_KEYS = (
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_projector_lr", "use_mm_proj", "image_grid_pinpoints",
    "tokenizer_model_max_length", "tokenizer_padding_side", "mm_patch_merge_type", "mm_vision_tower_lr",
    "unfreeze_mm_vision_tower",
)
ORIGINAL_MODEL_TYPES = ("llava", "llava_llama")

CLIP_VISION_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    "initializer_range", "initializer_factor",
)

# ------------------------------------------------------------------------------------------------------------------
# weight-name mapping (the table in conversion/README.md)
# ------------------------------------------------------------------------------------------------------------------

LANGUAGE_MODEL_RULES = [
    (re.compile(r"model\.embed_tokens\.weight"), "model.language_model.embed_tokens.weight", "resize_vocab"),
    (re.compile(r"model\.layers\.(\d+)\.(.+)"), r"model.language_model.layers.\1.\2", None),
    (re.compile(r"model\.norm\.weight"), "model.language_model.norm.weight", None),
    (re.compile(r"lm_head\.weight"), "lm_head.weight", "resize_vocab"),
]
PROJECTOR_PREFIX = "model.mm_projector."
OUR_PROJECTOR_PREFIX = "model.multi_modal_projector."
TOKENPACKER_PROJECTOR_NAMES = OrderedDict([
    ("q_proj_1.weight", "query_proj.weight"),
    ("ln_q_1.weight", "query_norm.weight"),
    ("ln_q_1.bias", "query_norm.bias"),
    ("k_proj_1.0.weight", "key_mlp.linear_1.weight"),
    ("k_proj_1.0.bias", "key_mlp.linear_1.bias"),
    ("k_proj_1.2.weight", "key_mlp.linear_2.weight"),
    ("k_proj_1.2.bias", "key_mlp.linear_2.bias"),
    ("ln_k_1.weight", "key_norm.weight"),
    ("ln_k_1.bias", "key_norm.bias"),
    ("v_proj_1.0.weight", "value_mlp.linear_1.weight"),
    ("v_proj_1.0.bias", "value_mlp.linear_1.bias"),
    ("v_proj_1.2.weight", "value_mlp.linear_2.weight"),
    ("v_proj_1.2.bias", "value_mlp.linear_2.bias"),
    ("ln_v_1.weight", "value_norm.weight"),
    ("ln_v_1.bias", "value_norm.bias"),
    # torch.nn.MultiheadAttention's packed input projection: rows [q; k; v]
    ("clip_attn.in_proj_weight", ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight")),
    ("clip_attn.in_proj_bias", ("attention.q_proj.bias", "attention.k_proj.bias", "attention.v_proj.bias")),
    ("clip_attn.out_proj.weight", "attention.out_proj.weight"),
    ("clip_attn.out_proj.bias", "attention.out_proj.bias"),
    ("mlp.0.weight", "output_mlp.linear_1.weight"),
    ("mlp.0.bias", "output_mlp.linear_1.bias"),
    ("mlp.2.weight", "output_mlp.linear_2.weight"),
    ("mlp.2.bias", "output_mlp.linear_2.bias"),
])
MLP2X_GELU_PROJECTOR_NAMES = OrderedDict([
    ("0.weight", "linear_1.weight"),
    ("0.bias", "linear_1.bias"),
    ("2.weight", "linear_2.weight"),
    ("2.bias", "linear_2.bias"),
])
PROJECTOR_NAMES = {"tokenpacker": TOKENPACKER_PROJECTOR_NAMES, "mlp2x_gelu": MLP2X_GELU_PROJECTOR_NAMES}

CLIP_PARTS = r"(?:embeddings|pre_layrnorm|encoder|post_layernorm)\..+"
EMBEDDED_TOWER_RULE = (re.compile(r"model\.vision_tower\.vision_tower\.vision_model\.(" + CLIP_PARTS + ")"),
                       r"model.vision_tower.\1")
# A CLIP folder: CLIPVisionModel / CLIPModel (`vision_model.*`, transformers 4.x) or 5.x CLIPVisionModel (bare).
CLIP_FOLDER_RULE = (re.compile(r"(?:vision_model\.)?(" + CLIP_PARTS + ")"), r"model.vision_tower.\1")

REASON_ROTARY = "rotary inv_freq buffer (recomputed from the config)"
REASON_POSITION_IDS = "CLIP position_ids buffer (an arange, recomputed)"
REASON_CLIP_TEXT = "CLIP text tower / contrastive head (unused by LLaVA)"
REASON_SUPERSEDED = "embedded vision tower superseded by --vision-tower (the original reads CLIP from mm_vision_tower)"
IGNORE_RULES = {
    "checkpoint": [
        (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"), REASON_ROTARY),
        (re.compile(r"model\.vision_tower\.vision_tower\.vision_model\.embeddings\.position_ids"), REASON_POSITION_IDS),
    ],
    "base_llm": [
        (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"), REASON_ROTARY),
    ],
    "vision": [
        (re.compile(r"(?:vision_model\.)?embeddings\.position_ids"), REASON_POSITION_IDS),
        (re.compile(r"text_model\..+|text_projection\.weight|visual_projection\.weight|logit_scale"), REASON_CLIP_TEXT),
    ],
    "projector": [],
}
ROLE_DESCRIPTIONS = {
    "checkpoint": "the original checkpoint",
    "base_llm": "the base LLM (--base-llm)",
    "vision": "the CLIP vision tower (--vision-tower)",
    "projector": "the stage-1 projector file (--projector-only)",
}


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message says what was expected and what was found."""


# ------------------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------------------

def parse_size(value):
    """'5GB', '500MB', '10KiB', '1234' -> bytes (KB/MB/GB decimal as transformers, KiB/MiB/GiB binary)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
    if not match:
        raise ConversionError(f"--max-shard-size must look like '5GB', '500MB' or a byte count; got {value!r}.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    size = int(number * scale)
    if size < 1:
        raise ConversionError(f"--max-shard-size must be positive; got {value!r}.")
    return size


def dtype_name(dtype):
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}.")


def resolve_dtype(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if value not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}; got {value!r}.")
    return value


def set_config_dtype(config, dtype):
    """The dtype a config records: `dtype` in transformers 5.x, `torch_dtype` in 4.x (5.x keeps the old name only as
    a deprecated alias)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def _looks_like_hub_id(value):
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(value))) and not str(value).startswith(".")


def resolve_location(value, what, allow_patterns=None):
    """A local folder (or file) as is; a Hub id through `huggingface_hub.snapshot_download`."""
    if value is None:
        return None
    if os.path.exists(value):
        return os.path.abspath(value)
    if not _looks_like_hub_id(value):
        raise ConversionError(f"{what}: {value!r} is neither an existing path nor a Hub repository id.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=value, allow_patterns=allow_patterns)
    except Exception as error:  # network, authentication, missing repo
        raise ConversionError(f"{what}: {value!r} is not a local path and could not be downloaded from the Hub "
                              f"({type(error).__name__}: {error}).") from error


CHECKPOINT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "pytorch_model*.bin", "pytorch_model.bin.index.json", "mm_projector.bin", "tokenizer*",
                       "special_tokens_map.json", "added_tokens.json"]
CLIP_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
                 "pytorch_model*.bin", "pytorch_model.bin.index.json"]


# ------------------------------------------------------------------------------------------------------------------
# reading tensors
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class SourceFile:
    """One weight file: its path, format ('safetensors' or 'bin') and role (checkpoint, base_llm, vision,
    projector)."""

    path: str
    fmt: str
    role: str


def find_weight_files(folder, role):
    """The weight files of a folder: an index (safetensors first, then .bin), a single file, or shards without an
    index. Other files (training_args.bin, optimizer states) are never looked at. Returns (files, index_map)."""
    folder = str(folder)
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no 'weight_map' (expected {{tensor name: shard file}}).")
            names = list(OrderedDict.fromkeys(weight_map.values()))
            missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
            if missing:
                raise ConversionError(f"{index_path} names shard files that are missing: {missing}.")
            return [SourceFile(os.path.join(folder, name), fmt, role) for name in names], weight_map
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(folder, single)):
            return [SourceFile(os.path.join(folder, single), fmt, role)], None
    for pattern, fmt in ((r"model-(\d+)-of-(\d+)\.safetensors", "safetensors"), (r"pytorch_model-(\d+)-of-(\d+)\.bin", "bin")):
        shards = sorted(name for name in os.listdir(folder) if re.fullmatch(pattern, name))
        if shards:
            total = int(re.fullmatch(pattern, shards[0]).group(2))
            if len(shards) != total:
                raise ConversionError(f"{folder} has {len(shards)} shards matching {pattern!r} but their names say "
                                      f"{total}; expected all of them (or an index file).")
            return [SourceFile(os.path.join(folder, name), fmt, role) for name in shards], None
    raise ConversionError(
        f"No weights found in {folder} ({ROLE_DESCRIPTIONS[role]}): expected model.safetensors, "
        "model.safetensors.index.json + shards, pytorch_model.bin, pytorch_model.bin.index.json + shards, or "
        "model-XXXXX-of-YYYYY.safetensors / pytorch_model-XXXXX-of-YYYYY.bin shards."
    )


def load_bin(path):
    """A `.bin` state dict, safely: `weights_only=True` (no arbitrary code) and memory-mapped when possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error).lower():
                raise
            # the legacy (pre-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise ConversionError(
                f"Refusing to load {path}: it is not a plain tensor state dict and unpickling it would need arbitrary "
                f"code (torch.load(weights_only=True) says: {str(error).splitlines()[-1][:300]}). Only load such a "
                "file if you trust it, e.g. re-save its tensors with safetensors in a trusted environment."
            ) from error
        raise ConversionError(f"Could not read {path} as a PyTorch state dict: {type(error).__name__}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a {{name: tensor}} state dict.")
    return state


def iter_file_tensors(source):
    """(name, tensor) for every tensor of one file, one file in memory (memory-mapped) at a time."""
    if source.fmt == "safetensors":
        with safe_open(source.path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    else:
        state = load_bin(source.path)
        for name in list(state):
            yield name, state.pop(name)
        del state


def scan_file(source):
    """{name: (shape, dtype)} of one file without reading its data."""
    if source.fmt == "safetensors":
        info = {}
        with safe_open(source.path, framework="pt") as handle:
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                info[name] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
        return info
    state = load_bin(source.path)
    return {name: (tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")) for name, tensor in state.items()}


# ------------------------------------------------------------------------------------------------------------------
# mapping
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class Mapping:
    """What happens to one source tensor: `targets` (our names; several for a split) and `op`, or `ignored` with
    a reason."""

    targets: tuple = ()
    op: str = None
    ignored: str = None


def classify(role, name, projector_type=None, use_embedded_tower=True):
    """The Mapping of source tensor `name` of a file with `role`; ConversionError for a name nobody knows."""
    for pattern, reason in IGNORE_RULES[role]:
        if pattern.fullmatch(name):
            return Mapping(ignored=reason)
    if role in ("checkpoint", "base_llm"):
        for pattern, target, op in LANGUAGE_MODEL_RULES:
            if pattern.fullmatch(name):
                return Mapping(targets=(pattern.sub(target, name),), op=op)
    if role == "checkpoint":
        pattern, target = EMBEDDED_TOWER_RULE
        if pattern.fullmatch(name):
            if not use_embedded_tower:
                return Mapping(ignored=REASON_SUPERSEDED)
            return Mapping(targets=(pattern.sub(target, name),))
    if role in ("checkpoint", "projector") and name.startswith(PROJECTOR_PREFIX):
        short = name[len(PROJECTOR_PREFIX):]
        names = PROJECTOR_NAMES.get(projector_type, {})
        if short in names:
            target = names[short]
            if isinstance(target, tuple):
                return Mapping(targets=tuple(OUR_PROJECTOR_PREFIX + t for t in target), op="split_qkv")
            return Mapping(targets=(OUR_PROJECTOR_PREFIX + target,))
    if role == "vision":
        pattern, target = CLIP_FOLDER_RULE
        if pattern.fullmatch(name):
            return Mapping(targets=(pattern.sub(target, name),))
    raise ConversionError(
        f"Unknown tensor {name!r} in {ROLE_DESCRIPTIONS[role]}: it is neither mapped nor on the ignore list "
        f"(projector type {projector_type!r}; see conversion/README.md for the mapping). Refusing to drop it silently."
    )


def mean_row(tensor):
    """The mean of the rows of a 2-D tensor in float64 (chunked, deterministic order)."""
    total = torch.zeros(tensor.shape[1], dtype=torch.float64)
    for chunk in tensor.split(4096, dim=0):
        total += chunk.to(torch.float64).sum(0)
    return total / tensor.shape[0]


def resize_vocab(tensor, new_rows, dtype):
    """Rows beyond the source's are the mean of the source rows (the usual init for added tokens)."""
    old_rows = tensor.shape[0]
    if new_rows < old_rows:
        raise ConversionError(f"cannot shrink a vocabulary matrix from {old_rows} to {new_rows} rows.")
    out = torch.empty((new_rows,) + tuple(tensor.shape[1:]), dtype=dtype)
    out[:old_rows] = tensor.to(dtype)
    if new_rows > old_rows:
        out[old_rows:] = mean_row(tensor).to(dtype)
    return out


def apply_mapping(mapping, tensor, dtype, vocab_rows):
    """The output tensors (contiguous, in `dtype`) of one mapped source tensor. A tensor already in `dtype` is not
    copied: it may stay a view of the memory-mapped source, which the streaming writer copies straight to disk."""
    if mapping.op == "split_qkv":
        if tensor.shape[0] % 3:
            raise ConversionError(f"a packed q/k/v projection needs a first dimension divisible by 3; got {tuple(tensor.shape)}.")
        parts = tensor.chunk(3, dim=0)
        return [(name, part.to(dtype=dtype).contiguous()) for name, part in zip(mapping.targets, parts)]
    if mapping.op == "resize_vocab":
        return [(mapping.targets[0], resize_vocab(tensor, vocab_rows, dtype))]
    return [(mapping.targets[0], tensor.to(dtype=dtype).contiguous())]


def mapped_shapes(mapping, shape, vocab_rows):
    if mapping.op == "split_qkv":
        return [(name, (shape[0] // 3,) + tuple(shape[1:])) for name in mapping.targets]
    if mapping.op == "resize_vocab":
        return [(mapping.targets[0], (vocab_rows,) + tuple(shape[1:]))]
    return [(mapping.targets[0], tuple(shape))]


@dataclass
class Plan:
    """Everything needed to reproduce the converted tensors from the source files (also read by the verifier)."""

    files: list
    projector_type: str
    dtype: str
    vocab_rows: int
    use_embedded_tower: bool
    image_aspect_ratio: str = "pad"
    image_token_id: int = None
    num_source_tensors: int = 0

    def save(self, path):
        write_json(path, {**asdict(self), "files": [asdict(item) for item in self.files]})

    @classmethod
    def load(cls, path):
        data = read_json(path)
        data["files"] = [SourceFile(**item) for item in data["files"]]
        return cls(**data)


def iter_converted(plan, on_tensor=None):
    """Stream the source files in order and yield (source name, Mapping, [(our name, tensor), ...]); ignored
    tensors yield an empty list. `on_tensor()` is called once per source tensor (progress)."""
    dtype = DTYPES[plan.dtype]
    for source in plan.files:
        for name, tensor in iter_file_tensors(source):
            mapping = classify(source.role, name, plan.projector_type, plan.use_embedded_tower)
            outputs = [] if mapping.ignored else apply_mapping(mapping, tensor, dtype, plan.vocab_rows)
            del tensor
            if on_tensor is not None:
                on_tensor()
            yield name, mapping, outputs


# ------------------------------------------------------------------------------------------------------------------
# configs and presets
# ------------------------------------------------------------------------------------------------------------------

def load_presets():
    """{name: preset dict} from configuration/*.json."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        preset = read_json(path)
        presets[preset.get("name", path.stem)] = preset
    return presets


def get_preset(name):
    presets = load_presets()
    for key, preset in presets.items():
        if key.lower() == str(name).lower():
            return preset
    raise ConversionError(f"Unknown preset {name!r}; available: {sorted(presets)}.")


def preset_facts(preset):
    text = preset["text_config"]
    return {
        "projector_type": preset["projector_type"],
        "hidden_size": text["hidden_size"],
        "num_hidden_layers": text["num_hidden_layers"],
        "num_attention_heads": text["num_attention_heads"],
        "intermediate_size": text["intermediate_size"],
        "scale_factor": preset["scale_factor"],
        "image_aspect_ratio": preset["image_aspect_ratio"],
        "patch_num": preset.get("patch_num"),
    }


def preset_mismatches(preset, facts):
    """[(field, preset value, checkpoint value)] where a checkpoint fact (None = unknown) contradicts the preset."""
    expected = preset_facts(preset)
    mismatches = []
    for key, value in facts.items():
        if value is None or key not in expected:
            continue
        if key == "patch_num" and expected[key] is None:
            continue  # a 'pad' family has no patch_num; a leftover key is harmless
        if expected[key] != value:
            mismatches.append((key, expected[key], value))
    return mismatches


def match_presets(facts):
    """Names of the presets the checkpoint facts are consistent with."""
    return [name for name, preset in load_presets().items() if not preset_mismatches(preset, facts)]


def validate_original_config(config, path):
    """Check `config` is an original TokenPacker / LLaVA-1.5 config.json; ConversionError otherwise."""
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object; got {type(config).__name__}.")
    model_type = config.get("model_type")
    if "text_config" in config or model_type == "tokenpacker":
        raise ConversionError(
            f"{path} is already a transformers-format config (model_type {model_type!r} with a nested text_config); "
            f"expected an original TokenPacker/LLaVA-1.5 config (model_type one of {ORIGINAL_MODEL_TYPES}, "
            "top-level LLaMA keys and mm_* keys)."
        )
    if model_type not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in config and "mm_hidden_size" not in config:
        raise ConversionError(
            f"{path} is not an original TokenPacker/LLaVA-1.5 config: expected model_type in {ORIGINAL_MODEL_TYPES} "
            f"with mm_vision_tower / mm_hidden_size keys; got model_type {model_type!r}"
            + ("" if "mm_vision_tower" in config else " without mm_vision_tower") + "."
        )
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in config:
            raise ConversionError(f"{path} lacks the LLaMA key {key!r} an original config carries at the top level.")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(key):
            raise ConversionError(f"{key}=true is not supported (TokenPacker and LLaVA-1.5 train with false); got "
                                  f"{config[key]!r} in {path}.")


def clip_vision_config_from_file(config, path):
    """The vision config dict of a CLIP folder's config.json (CLIPVisionModel or full CLIPModel layout)."""
    model_type = config.get("model_type")
    if model_type == "clip":
        vision = config.get("vision_config") or config.get("vision_config_dict") or {}
    elif model_type == "clip_vision_model":
        vision = config
    else:
        raise ConversionError(f"{path}: expected a CLIP config (model_type 'clip' or 'clip_vision_model'); got "
                              f"{model_type!r}.")
    out = {key: vision[key] for key in CLIP_VISION_CONFIG_KEYS if key in vision}
    out["model_type"] = "clip_vision_model"
    return out


def clip_vision_config_from_shapes(shapes, prefix):
    """Infer a CLIP vision config from the embedded tower's tensor shapes (CLIP conventions: 64-wide heads,
    quick_gelu, eps 1e-5)."""
    hidden = shapes[prefix + "embeddings.class_embedding"][0][0]
    patch_size = shapes[prefix + "embeddings.patch_embedding.weight"][0][-1]
    positions = shapes[prefix + "embeddings.position_embedding.weight"][0][0]
    grid = int(round((positions - 1) ** 0.5))
    layers = 1 + max(int(m.group(1)) for m in (re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", k) for k in shapes) if m)
    return {
        "model_type": "clip_vision_model",
        "hidden_size": hidden,
        "intermediate_size": shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0][0],
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


def image_processor_kwargs(clip_folder):
    """TokenPackerImageProcessor settings from a CLIP folder's preprocessor_config.json (legacy int sizes too)."""
    if clip_folder is None:
        return {}
    path = os.path.join(clip_folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return {}
    config = read_json(path)
    kwargs = {}
    for key in ("image_mean", "image_std", "resample"):
        if key in config:
            kwargs[key] = config[key]
    size = config.get("size")
    if isinstance(size, int):
        kwargs["size"] = {"shortest_edge": size}
    elif isinstance(size, dict) and "shortest_edge" in size:
        kwargs["size"] = {"shortest_edge": size["shortest_edge"]}
    crop = config.get("crop_size")
    if isinstance(crop, int):
        kwargs["crop_size"] = {"height": crop, "width": crop}
    elif isinstance(crop, dict) and {"height", "width"} <= set(crop):
        kwargs["crop_size"] = {"height": crop["height"], "width": crop["width"]}
    return kwargs


# ------------------------------------------------------------------------------------------------------------------
# the conversion
# ------------------------------------------------------------------------------------------------------------------

@dataclass
class ConversionResult:
    output: str
    dtype: str
    projector_type: str
    preset: str = None
    source_tensors: int = 0
    mapped_tensors: int = 0
    written_tensors: int = 0
    ignored: dict = field(default_factory=dict)  # reason -> count
    ignored_names: list = field(default_factory=list)
    bytes_written: int = 0
    shards: int = 0
    seconds: float = 0.0
    weights_seconds: float = 0.0  # streaming the tensors (read, map, write), without start-up and side files
    verified_tensors: int = None
    image_token_id: int = None
    pad_token_id: int = None
    vocab_size: int = None
    warnings: list = field(default_factory=list)
    pushed_to: str = None

    def summary(self):
        ignored = ", ".join(f"{count} x {reason}" for reason, count in sorted(self.ignored.items())) or "none"
        verified = ("skipped (--no-verify)" if self.verified_tensors is None
                    else f"{self.verified_tensors} tensors bit-exact after loading through the Auto classes")
        return "\n".join([
            f"Converted to {self.output}",
            f"  projector: {self.projector_type}; preset: {self.preset or 'none'}; dtype: {self.dtype}",
            f"  source tensors read: {self.source_tensors}; mapped: {self.mapped_tensors}; ignored: "
            f"{sum(self.ignored.values())} ({ignored})",
            f"  tensors written: {self.written_tensors} in {self.shards} shard(s), {self.bytes_written / 1e6:.1f} MB",
            f"  vocabulary: {self.vocab_size} rows; <image> id {self.image_token_id}; <pad> id {self.pad_token_id}",
            f"  verification: {verified}",
            f"  time: {self.seconds:.1f} s (tensors streamed in {self.weights_seconds:.1f} s, "
            f"{self.bytes_written / max(self.weights_seconds, 1e-9) / 1e6:.0f} MB/s)"
            + (f"; pushed to {self.pushed_to}" if self.pushed_to else ""),
        ])


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def plan_shards(entries, dtype, max_bytes):
    """Split `[(name, shape)]` (in the order the tensors will be produced) into shards of at most `max_bytes`
    (a larger tensor gets a shard of its own): `[[(name, shape, begin, end)], ...]` with byte offsets."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name, shape in entries:
        size = itemsize * math.prod(shape)
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, tuple(shape), used, used + size))
        used += size
    if current:
        shards.append(current)
    return shards


def safetensors_header(shard, dtype):
    """The 8-byte length + JSON header of a safetensors file holding `shard` (padded to 8 bytes, as safetensors
    writes it)."""
    header = {"__metadata__": {"format": "pt"}}
    for name, shape, begin, end in shard:
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(handle, name, tensor):
    """Append the raw bytes of tensor `name` (a separate function so tests can intercept what is written)."""
    handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class StreamingShardWriter:
    """Writes safetensors shards tensor by tensor. The scan knows every output name and shape in the order the
    conversion produces them, so each shard's header is written first and every tensor's bytes are appended as soon
    as it is converted: at most one converted tensor is in memory, whatever the shard size."""

    def __init__(self, folder, entries, dtype, max_bytes):
        self.folder = folder
        self.dtype = dtype
        self.shards = plan_shards(entries, dtype, max_bytes)
        self.shard_index, self.entry_index = 0, 0
        self.handle = None
        self.parts = []
        self.total_bytes = sum(shard[-1][3] for shard in self.shards)
        self.count = 0

    def add(self, name, tensor):
        if self.shard_index >= len(self.shards):
            raise ConversionError(f"Conversion produced {name!r} after every planned tensor was written.")
        expected, shape, _, _ = self.shards[self.shard_index][self.entry_index]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise ConversionError(f"Conversion produced {name!r} {tuple(tensor.shape)} {tensor.dtype}; the plan "
                                  f"expected {expected!r} {shape} {self.dtype} at this point.")
        if self.handle is None:
            part = f"part-{self.shard_index + 1:05d}.safetensors.tmp"
            self.handle = open(os.path.join(self.folder, part), "wb")
            self.handle.write(safetensors_header(self.shards[self.shard_index], self.dtype))
            self.parts.append((part, [entry[0] for entry in self.shards[self.shard_index]]))
        write_tensor(self.handle, name, tensor)
        self.count += 1
        self.entry_index += 1
        if self.entry_index == len(self.shards[self.shard_index]):
            self.handle.close()
            self.handle = None
            self.shard_index, self.entry_index = self.shard_index + 1, 0

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self):
        """Rename the parts to model.safetensors (one shard) or model-0000i-of-0000n.safetensors + index."""
        if self.shard_index != len(self.shards) or not self.parts:
            raise ConversionError(f"Conversion wrote {self.count} tensors; the plan has "
                                  f"{sum(len(shard) for shard in self.shards)}.")
        if len(self.parts) == 1:
            os.replace(os.path.join(self.folder, self.parts[0][0]), os.path.join(self.folder, "model.safetensors"))
            return 1
        weight_map = {}
        total = len(self.parts)
        for i, (part, names) in enumerate(self.parts, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.folder, part), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        write_json(os.path.join(self.folder, "model.safetensors.index.json"),
                   {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return total


class Converter:
    """One conversion; `run()` does it. See `convert()` for the arguments."""

    def __init__(self, output, input=None, projector_only=None, base_llm=None, vision_tower=None, tokenizer=None,
                 dtype=None, max_shard_size="5GB", overwrite=False, push_to_hub=None, private=False, verify=True,
                 preset=None, progress=True):
        if input is None and projector_only is None:
            raise ConversionError("Give --input ORIG_DIR (a full checkpoint) or --projector-only mm_projector.bin "
                                  "(with --base-llm and --vision-tower).")
        if projector_only is not None and (base_llm is None or vision_tower is None):
            raise ConversionError("--projector-only needs --base-llm LLM_DIR (the language model) and --vision-tower "
                                  "CLIP_DIR (a stage-1 save holds neither).")
        if base_llm is not None and projector_only is None:
            raise ConversionError("--base-llm is only used with --projector-only; a full checkpoint holds its LLM.")
        self.output = os.path.abspath(output)
        self.input = input
        self.projector_only = projector_only
        self.base_llm = base_llm
        self.vision_tower = vision_tower
        self.tokenizer_location = tokenizer
        self.dtype = resolve_dtype(dtype) if dtype is not None else None
        self.max_bytes = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.push_to_hub = push_to_hub
        self.private = private
        self.verify = verify
        self.preset_name = preset
        self.progress = progress
        self.warnings = []

    def warn(self, message):
        logger.warning(message)
        self.warnings.append(message)

    # -- inputs ------------------------------------------------------------------------------------------------

    def resolve_inputs(self):
        if os.path.exists(self.output) and not self.overwrite:
            raise ConversionError(f"The output folder {self.output} exists; pass --overwrite to replace it.")
        if os.path.exists(self.output) and not os.path.isdir(self.output):
            raise ConversionError(f"The output path {self.output} exists and is not a folder.")
        if self.projector_only is not None:
            projector_file = resolve_location(self.projector_only, "--projector-only")
            if not os.path.isfile(projector_file):
                raise ConversionError(f"--projector-only must name the mm_projector.bin file; got {projector_file}.")
            self.input_dir = resolve_location(self.input, "--input", CHECKPOINT_PATTERNS) if self.input else os.path.dirname(projector_file)
            fmt = "safetensors" if projector_file.endswith(".safetensors") else "bin"
            self.checkpoint_files = [SourceFile(projector_file, fmt, "projector")]
            self.checkpoint_index = None
            self.base_llm_dir = resolve_location(self.base_llm, "--base-llm", CHECKPOINT_PATTERNS)
            self.base_llm_files, self.base_llm_index = find_weight_files(self.base_llm_dir, "base_llm")
        else:
            self.input_dir = resolve_location(self.input, "--input", CHECKPOINT_PATTERNS)
            if not os.path.isdir(self.input_dir):
                raise ConversionError(f"--input must be a checkpoint folder; got the file {self.input_dir}.")
            self.checkpoint_files, self.checkpoint_index = find_weight_files(self.input_dir, "checkpoint")
            self.base_llm_dir, self.base_llm_files, self.base_llm_index = None, [], None
        config_path = os.path.join(self.input_dir, "config.json")
        if not os.path.isfile(config_path):
            raise ConversionError(f"No config.json in {self.input_dir}; the original checkpoint's config.json is needed.")
        self.config_path = config_path
        self.original = read_json(config_path)  # never AutoConfig: model_type 'llava' is transformers' own LLaVA
        validate_original_config(self.original, config_path)
        self.clip_dir = resolve_location(self.vision_tower, "--vision-tower", CLIP_PATTERNS)
        if self.clip_dir is not None:
            if not os.path.isfile(os.path.join(self.clip_dir, "config.json")):
                raise ConversionError(f"--vision-tower {self.clip_dir} has no config.json (expected a CLIPVisionModel "
                                      "or CLIPModel folder).")
            self.clip_files, self.clip_index = find_weight_files(self.clip_dir, "vision")
        else:
            self.clip_files, self.clip_index = [], None

    def scan(self):
        """Shapes of every source tensor, checked against the index files; unknown names fail here, before
        anything is written."""
        self.shapes = {"checkpoint": {}, "projector": {}, "base_llm": {}, "vision": {}}
        self.file_shapes = {}
        groups = [(self.checkpoint_files, self.checkpoint_index), (self.base_llm_files, self.base_llm_index),
                  (self.clip_files, self.clip_index)]
        for files, index in groups:
            seen = {}
            for source in files:
                self.file_shapes[source.path] = scan_file(source)
                for name, info in self.file_shapes[source.path].items():
                    if index is not None and os.path.join(os.path.dirname(source.path), index.get(name, "")) != source.path:
                        raise ConversionError(f"{source.path} holds {name!r}, which its index file "
                                              f"{'does not list' if name not in index else 'assigns to ' + index[name]}.")
                    if name in seen:
                        raise ConversionError(f"{name!r} appears in two weight files: {seen[name]} and {source.path}.")
                    seen[name] = source.path
                    self.shapes[source.role][name] = info
            if index is not None:
                missing = sorted(set(index) - set(seen))
                if missing:
                    raise ConversionError(f"The index file lists tensors that no shard holds: {missing[:10]}"
                                          f"{' ...' if len(missing) > 10 else ''}.")

    # -- decisions -----------------------------------------------------------------------------------------------

    def decide_projector(self):
        role = "projector" if self.projector_only else "checkpoint"
        names = {name[len(PROJECTOR_PREFIX):] for name in self.shapes[role] if name.startswith(PROJECTOR_PREFIX)}
        if not names:
            raise ConversionError(f"No projector weights ({PROJECTOR_PREFIX}*) in {ROLE_DESCRIPTIONS[role]}: expected "
                                  f"the 23 TokenPacker tensors or LLaVA-1.5's mlp2x_gelu ({sorted(MLP2X_GELU_PROJECTOR_NAMES)}).")
        if "q_proj_1.weight" in names:
            projector_type = "tokenpacker"
        elif "0.weight" in names:
            projector_type = "mlp2x_gelu"
        else:
            raise ConversionError(f"Unrecognised projector weights {sorted(names)[:8]}: expected TokenPacker's "
                                  f"(q_proj_1, k_proj_1, ...) or mlp2x_gelu's (0.weight, 2.weight).")
        expected = set(PROJECTOR_NAMES[projector_type])
        if names - expected:
            unknown = [PROJECTOR_PREFIX + name for name in sorted(names - expected)]
            raise ConversionError(f"Unknown tensor(s) {unknown} in {ROLE_DESCRIPTIONS[role]}: not part of the "
                                  f"{projector_type} projector and not on the ignore list (see conversion/README.md). "
                                  "Refusing to drop them silently.")
        if expected - names:
            raise ConversionError(f"The {projector_type} projector is incomplete: missing "
                                  f"{[PROJECTOR_PREFIX + name for name in sorted(expected - names)]}.")
        declared = self.original.get("mm_projector_type")
        if declared is not None and declared != projector_type:
            if projector_type == "tokenpacker":
                logger.info("config says mm_projector_type=%r; the original ignores it and always builds TokenPacker "
                            "(the weights say so too).", declared)
            else:
                self.warn(f"config says mm_projector_type={declared!r} but the weights are {projector_type}'s; "
                          "following the weights.")
        self.projector_type = projector_type
        self.projector_shapes = {name: self.shapes[role][PROJECTOR_PREFIX + name][0] for name in names}

    def decide_vision(self):
        embedded_prefix = "model.vision_tower.vision_tower.vision_model."
        embedded = {k: v for k, v in self.shapes["checkpoint"].items() if k.startswith("model.vision_tower.")}
        mm_vision_tower = self.original.get("mm_vision_tower")
        if self.clip_dir is not None:
            self.use_embedded_tower = False
            clip_config_path = os.path.join(self.clip_dir, "config.json")
            self.vision_config = clip_vision_config_from_file(read_json(clip_config_path), clip_config_path)
            if embedded:
                logger.info("The checkpoint embeds a vision tower copy (%d tensors); using --vision-tower instead, as "
                            "the original does.", len(embedded))
                self.check_embedded_matches_folder(embedded)
        elif embedded:
            self.use_embedded_tower = True
            self.warn(
                f"No --vision-tower given: using the vision tower embedded in the checkpoint ({len(embedded)} tensors, "
                f"{next(iter(embedded.values()))[1]}). The original ignores this copy and reads CLIP from "
                f"mm_vision_tower={mm_vision_tower!r} (in its own dtype), so outputs can differ slightly; pass "
                "--vision-tower for exact parity."
            )
            if self.preset is not None and "vision_config" in self.preset:
                self.vision_config = dict(self.preset["vision_config"], model_type="clip_vision_model")
            else:
                self.vision_config = clip_vision_config_from_shapes(self.shapes["checkpoint"], embedded_prefix)
                self.warn(f"Vision config inferred from the embedded tensors' shapes with CLIP conventions: "
                          f"{self.vision_config}.")
        else:
            raise ConversionError(
                "No vision tower: the checkpoint embeds none, and no --vision-tower was given. Pass --vision-tower "
                f"CLIP_DIR (a CLIP checkpoint folder or Hub id; the config names mm_vision_tower={mm_vision_tower!r}), "
                "or convert a checkpoint that embeds the tower (model.vision_tower.vision_tower.vision_model.*)."
            )
        if self.original.get("mm_hidden_size") not in (None, self.vision_config.get("hidden_size")):
            self.warn(f"config mm_hidden_size={self.original['mm_hidden_size']} differs from the vision tower's hidden "
                      f"size {self.vision_config.get('hidden_size')}; the original ignores mm_hidden_size.")

    def check_embedded_matches_folder(self, embedded):
        folder = {}
        for name, info in self.shapes["vision"].items():
            mapping = classify("vision", name)
            if not mapping.ignored:
                folder[mapping.targets[0]] = info[0]
        for name, info in embedded.items():
            match = EMBEDDED_TOWER_RULE[0].fullmatch(name)
            if match:
                target = EMBEDDED_TOWER_RULE[0].sub(EMBEDDED_TOWER_RULE[1], name)
                if target in folder and folder[target] != info[0]:
                    raise ConversionError(f"The embedded vision tower does not match --vision-tower: {name} has shape "
                                          f"{list(info[0])} in the checkpoint but {list(folder[target])} in {self.clip_dir}.")

    def decide_preset(self):
        original = self.original
        scale_factor = original.get("scale_factor", 2 if self.projector_type == "tokenpacker" else None)
        facts = {
            "projector_type": self.projector_type,
            "hidden_size": original["hidden_size"],
            "num_hidden_layers": original["num_hidden_layers"],
            "num_attention_heads": original["num_attention_heads"],
            "intermediate_size": original["intermediate_size"],
            "scale_factor": scale_factor if self.projector_type == "tokenpacker" else None,
            "image_aspect_ratio": original.get("image_aspect_ratio"),
            "patch_num": int(original["patch_num"]) if original.get("patch_num") is not None else None,
        }
        self.preset = None
        if self.preset_name is not None:
            self.preset = get_preset(self.preset_name)
            mismatches = preset_mismatches(self.preset, facts)
            if mismatches:
                detail = "; ".join(f"{key}: preset expects {want!r}, checkpoint has {have!r}" for key, want, have in mismatches)
                raise ConversionError(f"The checkpoint does not match preset {self.preset['name']!r}: {detail}.")
        elif self.projector_type == "tokenpacker":
            matches = match_presets(facts)
            if len(matches) == 1:
                self.preset = get_preset(matches[0])
                logger.info("Preset auto-detected: %s", matches[0])
            elif len(matches) > 1:
                self.warn(f"The config matches several presets {matches}; none applied (pass --preset NAME to fill "
                          "settings the config lacks, e.g. patch_num).")
        self.facts = facts

    def decide_settings(self):
        """The TokenPacker settings: the original config's, completed (and checked) with the preset's."""
        original, preset = self.original, self.preset or {}
        if self.projector_type == "tokenpacker":
            self.scale_factor = int(original.get("scale_factor", preset.get("scale_factor", 2)))
            if "scale_factor" not in original:
                self.warn(f"config has no scale_factor; using {self.scale_factor}"
                          + (" (preset)" if preset else " (the original's default)") + ".")
        else:
            self.scale_factor = 2  # unused by mlp2x_gelu
        grid = self.vision_config.get("image_size", 336) // self.vision_config.get("patch_size", 14)
        if self.projector_type == "tokenpacker" and (self.scale_factor < 1 or grid % self.scale_factor):
            divisors = [d for d in range(1, grid + 1) if grid % d == 0]
            raise ConversionError(f"scale_factor must divide the {grid}x{grid} patch grid: expected one of {divisors}; "
                                  f"got {self.scale_factor}.")
        select_feature = original.get("mm_vision_select_feature", "patch")
        if select_feature == "patch":
            self.select_strategy = "default"
        elif select_feature == "cls_patch" and self.projector_type == "mlp2x_gelu":
            self.select_strategy = "full"
        else:
            allowed = "'patch'" if self.projector_type == "tokenpacker" else "'patch' or 'cls_patch'"
            raise ConversionError(f"mm_vision_select_feature must be {allowed} for the {self.projector_type} projector; "
                                  f"got {select_feature!r}.")
        self.vision_feature_layer = int(original.get("mm_vision_select_layer", preset.get("vision_feature_layer", -2)))
        self.image_aspect_ratio = original.get("image_aspect_ratio", preset.get("image_aspect_ratio", "square"))
        if self.image_aspect_ratio == "slice":
            if original.get("patch_num") is not None:
                self.patch_num = int(original["patch_num"])
            elif preset.get("patch_num") is not None:
                self.patch_num = int(preset["patch_num"])
                self.warn(f"config has no patch_num; using the preset's {self.patch_num}.")
            else:
                self.patch_num = 9
                self.warn("config has no patch_num; using 9, as the original's evaluation does "
                          "(getattr(config, 'patch_num', '9')). Pass --preset for a 16-patch family.")
        else:
            self.patch_num = int(original.get("patch_num", preset.get("patch_num") or 9))
        self.region_feature_layers = list(preset.get("region_feature_layers", DEFAULT_REGION_FEATURE_LAYERS))
        if self.projector_type == "tokenpacker":
            embed_dim = self.projector_shapes["q_proj_1.weight"][0]
            if preset and embed_dim != preset.get("projector_hidden_size", embed_dim):
                raise ConversionError(f"The projector is {embed_dim} wide; preset {preset['name']!r} expects "
                                      f"{preset['projector_hidden_size']}.")
            self.projector_hidden_size = embed_dim
            # the original: nn.MultiheadAttention(embed_dim, embed_dim // 128)
            self.projector_num_heads = int(preset.get("projector_num_heads", max(1, embed_dim // 128)))
            region_width = self.projector_shapes["k_proj_1.0.weight"][1]
            levels = region_width / self.vision_config["hidden_size"]
            if levels != len(self.region_feature_layers):
                raise ConversionError(f"The projector's keys read {region_width} channels = {levels} x the vision width "
                                      f"{self.vision_config['hidden_size']}; expected {len(self.region_feature_layers)} "
                                      f"levels (layers {self.region_feature_layers}).")
        else:
            self.projector_hidden_size, self.projector_num_heads = 1024, 8  # unused by mlp2x_gelu
        if self.dtype is None:
            declared = original.get("torch_dtype") or original.get("dtype")
            self.dtype = declared if declared in DTYPES else "float16"
            logger.info("dtype: %s (from the config's torch_dtype; --dtype to change)", self.dtype)

    def decide_text_config(self):
        source = self.original
        if self.base_llm_dir is not None:
            llm_config_path = os.path.join(self.base_llm_dir, "config.json")
            if not os.path.isfile(llm_config_path):
                raise ConversionError(f"--base-llm {self.base_llm_dir} has no config.json.")
            source = read_json(llm_config_path)
            if source.get("model_type") != "llama":
                raise ConversionError(f"--base-llm must be a LLaMA folder (model_type 'llama'); got "
                                      f"{source.get('model_type')!r} in {llm_config_path}.")
            for key in ("hidden_size", "num_hidden_layers"):
                if key in self.original and self.original[key] != source.get(key):
                    raise ConversionError(f"--base-llm {key}={source.get(key)} differs from the projector's config "
                                          f"({self.original[key]}).")
        self.text_source = {key: source[key] for key in LLAMA_CONFIG_KEYS if key in source}
        unknown = sorted(set(self.original) - set(LLAMA_CONFIG_KEYS) - set(LLAVA_CONFIG_KEYS) - set(IGNORED_CONFIG_KEYS))
        if unknown:
            self.warn(f"config keys not used by the converted model: {unknown}.")
        llm_role = "base_llm" if self.base_llm_dir else "checkpoint"
        shapes = self.shapes[llm_role]
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name not in shapes:
                raise ConversionError(f"{ROLE_DESCRIPTIONS[llm_role]} has no {name}; expected a LLaMA causal LM.")
        self.source_vocab_rows = shapes["model.embed_tokens.weight"][0][0]
        if shapes["lm_head.weight"][0][0] != self.source_vocab_rows:
            raise ConversionError(f"embed_tokens has {self.source_vocab_rows} rows but lm_head has "
                                  f"{shapes['lm_head.weight'][0][0]}; expected equal vocabularies.")

    def load_tokenizer(self):
        from transformers import LlamaTokenizerFast

        candidates = [self.tokenizer_location] if self.tokenizer_location else [self.input_dir, self.base_llm_dir]
        folder = None
        for candidate in candidates:
            if candidate is None:
                continue
            candidate = resolve_location(candidate, "--tokenizer", ["tokenizer*", "special_tokens_map.json", "added_tokens.json"])
            if any(os.path.isfile(os.path.join(candidate, name)) for name in ("tokenizer.model", "tokenizer.json")):
                folder = candidate
                break
        if folder is None:
            raise ConversionError(f"No tokenizer (tokenizer.model or tokenizer.json) in {[c for c in candidates if c]}; "
                                  "pass --tokenizer DIR (e.g. the base Vicuna folder).")
        # Never AutoTokenizer here: on a folder whose config says model_type 'llava', transformers 5 returns a
        # generic tokenizer without SentencePiece's dummy prefix (different ids). LLaMA's own class gives the
        # original's ids.
        tokenizer = LlamaTokenizerFast.from_pretrained(folder)
        if len(tokenizer) > self.source_vocab_rows:
            self.warn(f"The tokenizer has {len(tokenizer)} tokens but the embeddings only {self.source_vocab_rows} "
                      "rows; the extra tokens get the mean row.")
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.convert_tokens_to_ids(PAD_TOKEN) in (None, tokenizer.unk_token_id):
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        tokenizer.pad_token = PAD_TOKEN
        tokenizer.padding_side = "left"
        self.tokenizer = tokenizer
        self.tokenizer_dir = folder
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.pad_token_id = tokenizer.pad_token_id
        self.vocab_rows = round_up(max(len(tokenizer), self.source_vocab_rows), VOCAB_MULTIPLE)

    def build_config(self):
        from modeling_tokenpacker import TokenPackerConfig

        text = dict(self.text_source)
        text.update(model_type="llama", vocab_size=self.vocab_rows, pad_token_id=self.pad_token_id,
                    bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    tie_word_embeddings=False)
        if self.preset:
            for key, value in self.preset["text_config"].items():
                if text.get(key, value) != value:
                    raise ConversionError(f"text config {key}={text[key]} contradicts preset {self.preset['name']!r} "
                                          f"({value}).")
            vision_preset = self.preset.get("vision_config", {})
            for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
                if key in vision_preset and self.vision_config.get(key, vision_preset[key]) != vision_preset[key]:
                    raise ConversionError(f"vision tower {key}={self.vision_config[key]} contradicts preset "
                                          f"{self.preset['name']!r} ({vision_preset[key]}).")
        self.config = TokenPackerConfig(
            vision_config=dict(self.vision_config),
            text_config=text,
            projector_type=self.projector_type,
            scale_factor=self.scale_factor,
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.select_strategy,
            region_feature_layers=self.region_feature_layers,
            projector_hidden_size=self.projector_hidden_size,
            projector_num_heads=self.projector_num_heads,
            image_token_id=self.image_token_id,
            image_aspect_ratio=self.image_aspect_ratio,
            patch_num=self.patch_num,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.pad_token_id,
            tie_word_embeddings=False,
        )

    def build_plan(self):
        files = list(self.checkpoint_files) + list(self.base_llm_files) + list(self.clip_files)
        num = sum(len(self.file_shapes[source.path]) for source in files)
        self.plan = Plan(files=files, projector_type=self.projector_type, dtype=self.dtype, vocab_rows=self.vocab_rows,
                         use_embedded_tower=self.use_embedded_tower, image_aspect_ratio=self.image_aspect_ratio,
                         image_token_id=self.image_token_id, num_source_tensors=num)

    def check_against_model(self):
        """Every parameter of the target model gets exactly one source tensor of the right shape."""
        from modeling_tokenpacker import TokenPackerForConditionalGeneration

        with torch.device("meta"):
            model = TokenPackerForConditionalGeneration(self.config)
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        planned, ignored = {}, Counter()
        for source in self.plan.files:
            for name, (shape, _) in self.file_shapes[source.path].items():
                mapping = classify(source.role, name, self.projector_type, self.use_embedded_tower)
                if mapping.ignored:
                    ignored[mapping.ignored] += 1
                    continue
                for target, target_shape in mapped_shapes(mapping, shape, self.vocab_rows):
                    if target in planned:
                        raise ConversionError(f"Two source tensors map to {target}; the second is {name}.")
                    planned[target] = target_shape
        missing = sorted(set(expected) - set(planned))
        extra = sorted(set(planned) - set(expected))
        wrong = [(n, planned[n], expected[n]) for n in sorted(set(planned) & set(expected)) if planned[n] != expected[n]]
        if missing or extra or wrong:
            parts = []
            if missing:
                parts.append(f"no source tensor for {missing[:10]}{' ...' if len(missing) > 10 else ''}")
            if extra:
                parts.append(f"source tensors for names the model lacks: {extra[:10]}")
            if wrong:
                parts.append("shape mismatches (source -> expected): "
                             + ", ".join(f"{n} {list(a)} -> {list(b)}" for n, a, b in wrong[:10]))
            raise ConversionError("The checkpoint does not fit the TokenPacker model built from its config: "
                                  + "; ".join(parts) + ".")
        self.expected_ignored = ignored

    # -- output --------------------------------------------------------------------------------------------------

    def output_entries(self):
        """`[(our name, shape)]` in the order `iter_converted` will produce the tensors (from the scan)."""
        entries = []
        for source in self.plan.files:
            for name, (shape, _) in self.file_shapes[source.path].items():
                mapping = classify(source.role, name, self.plan.projector_type, self.plan.use_embedded_tower)
                if not mapping.ignored:
                    entries.extend(mapped_shapes(mapping, shape, self.plan.vocab_rows))
        return entries

    def write_weights(self, folder, result):
        from tqdm.auto import tqdm

        start = time.perf_counter()
        writer = StreamingShardWriter(folder, self.output_entries(), DTYPES[self.plan.dtype], self.max_bytes)
        bar = tqdm(total=self.plan.num_source_tensors, unit="tensor", desc="Converting", disable=not self.progress)
        try:
            for name, mapping, outputs in iter_converted(self.plan, on_tensor=lambda: bar.update(1)):
                result.source_tensors += 1
                if mapping.ignored:
                    result.ignored[mapping.ignored] = result.ignored.get(mapping.ignored, 0) + 1
                    result.ignored_names.append(name)
                    continue
                result.mapped_tensors += 1
                for target, tensor in outputs:
                    writer.add(target, tensor)
        finally:
            bar.close()
            writer.close()
        result.shards = writer.finish()
        result.written_tensors = writer.count
        result.bytes_written = writer.total_bytes
        result.weights_seconds = time.perf_counter() - start

    def write_config_files(self, folder):
        from modeling_tokenpacker.configuration_tokenpacker import AUTO_MAP
        from modeling_tokenpacker.remote_code import shipped_files
        from transformers import GenerationConfig

        config = self.config
        config.auto_map = dict(AUTO_MAP)
        config.architectures = ["TokenPackerForConditionalGeneration"]
        set_config_dtype(config, DTYPES[self.dtype])
        config.save_pretrained(folder)
        for name, path in shipped_files().items():
            shutil.copyfile(path, os.path.join(folder, name))
        generation = GenerationConfig(bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.pad_token_id)
        generation.save_pretrained(folder)

    def write_processor(self, folder):
        from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor, load_chat_template

        kwargs = image_processor_kwargs(self.clip_dir)
        image_processor = TokenPackerImageProcessor(
            image_aspect_ratio=self.image_aspect_ratio, patch_num=self.patch_num, **kwargs)
        processor = TokenPackerProcessor(image_processor, self.tokenizer, image_seq_length=self.config.image_seq_length,
                                         chat_template=load_chat_template("vicuna_v1"))
        processor.save_pretrained(folder)

    def write_model_card(self, folder, result):
        import modeling_tokenpacker
        import transformers

        preset = self.preset or {}
        base_models = []
        if self.input and not os.path.exists(self.input) and _looks_like_hub_id(self.input):
            base_models.append(self.input)
        elif preset.get("base_llm"):
            base_models.append(preset["base_llm"])
        license_name = preset.get("license", "other")
        source_name = os.path.basename(os.path.normpath(self.input_dir))
        lines = ["---", f"license: {license_name}", "library_name: transformers", "pipeline_tag: image-text-to-text"]
        if base_models:
            lines.append("base_model:")
            lines.extend(f"- {name}" for name in base_models)
        lines += ["tags:", "- tokenpacker", "- llava", "- multimodal", "- image-text-to-text", "---", ""]
        title = preset.get("name", source_name)
        tokens = self.config.image_seq_length
        verified = ("not run (--no-verify)" if result.verified_tensors is None else
                    f"{result.verified_tensors} tensors equal bit for bit after loading with "
                    "`AutoModelForImageTextToText(trust_remote_code=True)` in a fresh process")
        hd_note = (f"\nTokenPacker-HD: the processor cuts each image into up to {self.patch_num} blocks of 336 px "
                   "plus a global view, as the original evaluation does.\n"
                   if self.image_aspect_ratio == "slice" else "")
        body = f"""# {title} (transformers format)

TokenPacker ([arXiv 2407.02392](https://arxiv.org/abs/2407.02392)) converted from the original LLaVA-1.5-fork
checkpoint to a 🤗 transformers model with remote code: projector `{self.projector_type}`
(scale factor {self.scale_factor}, {tokens} visual tokens per 336-px block), image aspect ratio
`{self.image_aspect_ratio}`, vicuna_v1 chat template.
{hd_note}
## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{self.push_to_hub or 'path/to/this/folder'}"
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.jpg")], text=[prompt], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

## Conversion provenance

| | |
|---|---|
| source folder | `{source_name}` |
| source config.json sha256 | `{sha256_file(self.config_path)}` |
| vision tower | {'embedded copy in the checkpoint' if self.use_embedded_tower else f'`{os.path.basename(os.path.normpath(self.clip_dir))}` (--vision-tower)'} |
| tokenizer | `{os.path.basename(os.path.normpath(self.tokenizer_dir))}` + `<image>` (id {self.image_token_id}) and `<pad>` (id {self.pad_token_id}); embeddings resized {self.source_vocab_rows} -> {self.vocab_rows} rows (new rows = mean of the old ones) |
| preset | {preset.get('name', 'none')} |
| dtype | {self.dtype} |
| tensors | {result.source_tensors} read, {result.mapped_tensors} mapped, {sum(result.ignored.values())} ignored ({', '.join(f'{c} x {r}' for r, c in sorted(result.ignored.items())) or 'none'}) |
| verification | {verified} |
| converter | `conversion/convert_tokenpacker_to_hf.py` {CONVERTER_VERSION}, modeling_tokenpacker {modeling_tokenpacker.__version__}, transformers {transformers.__version__}, torch {torch.__version__} |
| date (UTC) | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} |
"""
        with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + body)

    # -- driver --------------------------------------------------------------------------------------------------

    def prepare(self):
        self.resolve_inputs()
        self.scan()
        self.decide_projector()
        self.preset = None
        self.decide_preset()
        self.decide_vision()
        self.decide_settings()
        self.decide_text_config()
        self.load_tokenizer()
        self.build_config()
        self.build_plan()
        self.check_against_model()

    def run(self):
        start = time.perf_counter()
        self.prepare()
        result = ConversionResult(output=self.output, dtype=self.dtype, projector_type=self.projector_type,
                                  preset=(self.preset or {}).get("name"), image_token_id=self.image_token_id,
                                  pad_token_id=self.pad_token_id, vocab_size=self.vocab_rows)
        parent = os.path.dirname(self.output)
        os.makedirs(parent, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_]", "_", os.path.basename(self.output))[:40]
        # no dots in the name: transformers imports remote code under a module name derived from the folder
        tmp = tempfile.mkdtemp(prefix=f"_tmp_convert_{safe}_", dir=parent)
        try:
            self.write_weights(tmp, result)
            self.write_config_files(tmp)
            self.write_processor(tmp)
            if self.verify:
                result.verified_tensors = verify_output(tmp, self.plan)
            self.write_model_card(tmp, result)
            if os.path.exists(self.output):
                trash = tempfile.mkdtemp(prefix="_tmp_replaced_", dir=parent)
                os.rename(self.output, os.path.join(trash, "old"))
                os.rename(tmp, self.output)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, self.output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.push_to_hub:
            result.pushed_to = push_folder_to_hub(self.output, self.push_to_hub, self.private)
        result.seconds = time.perf_counter() - start
        result.warnings = list(self.warnings)
        return result


def convert(output, input=None, projector_only=None, base_llm=None, vision_tower=None, tokenizer=None, dtype=None,
            max_shard_size="5GB", overwrite=False, push_to_hub=None, private=False, verify=True, preset=None,
            progress=True):
    """Convert an original checkpoint (`input`: folder or Hub id), or a stage-1 `projector_only` file with
    `base_llm`, into `output`. Returns a `ConversionResult`; raises `ConversionError` (a ValueError) with expected
    vs. received on bad input."""
    return Converter(output, input=input, projector_only=projector_only, base_llm=base_llm, vision_tower=vision_tower,
                     tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                     push_to_hub=push_to_hub, private=private, verify=verify, preset=preset, progress=progress).run()


# ------------------------------------------------------------------------------------------------------------------
# verification in a fresh process
# ------------------------------------------------------------------------------------------------------------------

VERIFY_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_tokenpacker":
                raise ImportError("verification loads the checkpoint's own remote code, not modeling_tokenpacker")
            return None

    sys.meta_path.insert(0, _BlockPackage())
    repo_root, output, plan_path = sys.argv[1:4]
    sys.path.insert(0, repo_root)
    from conversion.convert_tokenpacker_to_hf import verify_in_this_process

    print(json.dumps(verify_in_this_process(output, plan_path)))
    """
)


def verify_in_this_process(output, plan_path):
    """Load `output` through the Auto classes (remote code) and compare every state-dict tensor with the mapped
    source tensor, bit for bit. Returns a JSON-able report; used by the verification child."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    plan = Plan.load(plan_path)
    dtype = DTYPES[plan.dtype]
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, **{dtype_kwarg: dtype})
    state = model.state_dict()
    report = {"module": type(model).__module__, "class": type(model).__name__, "num_state_tensors": len(state),
              "checked": 0, "mismatched": [], "unexpected": [], "missing": [], "wrong_dtype": [],
              "imported_package": False, "processor": None}
    seen = set()
    for _, _, outputs in iter_converted(plan):
        for name, tensor in outputs:
            if name not in state:
                report["unexpected"].append(name)
                continue
            have = state[name]
            seen.add(name)
            report["checked"] += 1
            if have.dtype != dtype:
                report["wrong_dtype"].append(f"{name}: {have.dtype}")
            elif have.shape != tensor.shape or not torch.equal(have, tensor):
                report["mismatched"].append(name)
    report["missing"] = sorted(set(state) - seen)
    tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    report["tokenizer_image_token_id"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    report["config_image_token_id"] = model.config.image_token_id
    report["processor"] = type(AutoProcessor.from_pretrained(output, trust_remote_code=True)).__name__
    report["imported_package"] = any(name.split(".")[0] == "modeling_tokenpacker" for name in sys.modules)
    return report


def verify_output(folder, plan):
    """Run `verify_in_this_process` in a fresh interpreter (`python -I`, the package blocked); returns the number of
    tensors checked, or raises ConversionError with what differs."""
    with tempfile.TemporaryDirectory(prefix="tokenpacker_verify_") as scratch:
        plan_path = os.path.join(scratch, "plan.json")
        plan.save(plan_path)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        # the remote-code copy transformers makes of the (temporary) folder goes away with the scratch folder
        env["HF_MODULES_CACHE"] = os.path.join(scratch, "modules")
        logger.info("Verifying %s in a fresh process ...", folder)
        completed = subprocess.run([sys.executable, "-I", "-c", VERIFY_CHILD, str(REPO_ROOT), folder, plan_path],
                                   capture_output=True, text=True, cwd=scratch, env=env)
    if completed.returncode != 0:
        raise ConversionError(f"Verification failed: loading the converted folder in a fresh process crashed:\n"
                              f"{completed.stderr[-4000:]}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    problems = []
    if report["mismatched"]:
        problems.append(f"{len(report['mismatched'])} tensors differ from the source: {report['mismatched'][:10]}")
    for key in ("unexpected", "missing", "wrong_dtype"):
        if report[key]:
            problems.append(f"{key}: {report[key][:10]}")
    if not report["module"].startswith("transformers_modules"):
        problems.append(f"the model class came from {report['module']}, not the checkpoint's remote code")
    if report["imported_package"]:
        problems.append("the child imported modeling_tokenpacker")
    if report["tokenizer_image_token_id"] != report["config_image_token_id"]:
        problems.append(f"tokenizer <image> id {report['tokenizer_image_token_id']} != config image_token_id "
                        f"{report['config_image_token_id']}")
    if report["checked"] != report["num_state_tensors"]:
        problems.append(f"checked {report['checked']} of {report['num_state_tensors']} state-dict tensors")
    if problems:
        raise ConversionError("Verification failed: " + "; ".join(problems) + ".")
    logger.info("Verified: %d tensors bit-exact (%s, processor: %s).", report["checked"], report["class"],
                report["processor"])
    return report["checked"]


# ------------------------------------------------------------------------------------------------------------------
# Hub
# ------------------------------------------------------------------------------------------------------------------

def push_folder_to_hub(folder, repo_id, private=False):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                      commit_message=f"TokenPacker checkpoint converted with convert_tokenpacker_to_hf {CONVERTER_VERSION}")
    logger.info("Pushed %s to https://huggingface.co/%s", folder, repo_id)
    return repo_id


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="convert_tokenpacker_to_hf.py",
        description="Convert an original TokenPacker (LLaVA-1.5 fork) checkpoint to the transformers format.",
    )
    source = parser.add_argument_group("source")
    source.add_argument("--input", help="original checkpoint folder (or Hub id): config.json + weights")
    source.add_argument("--projector-only", help="a stage-1 mm_projector.bin (its config.json beside it)")
    source.add_argument("--base-llm", help="with --projector-only: the LLaMA/Vicuna folder the projector was trained on")
    source.add_argument("--vision-tower", help="CLIP folder or Hub id (CLIPVisionModel or CLIPModel); preferred over "
                                               "a copy embedded in the checkpoint, as the original does")
    source.add_argument("--tokenizer", help="tokenizer folder (default: the input folder, else --base-llm)")
    source.add_argument("--preset", help="a family from configuration/ (default: auto-detected when exactly one fits)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="output folder (written atomically)")
    out.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the config's torch_dtype)")
    out.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    out.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip reloading the output in a fresh process and comparing every tensor")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is None and args.projector_only is None:
        parser.error("one of --input or --projector-only is required")
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        result = convert(args.output, input=args.input, projector_only=args.projector_only, base_llm=args.base_llm,
                         vision_tower=args.vision_tower, tokenizer=args.tokenizer, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
                         private=args.private, verify=args.verify, preset=args.preset, progress=args.progress)
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

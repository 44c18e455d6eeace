"""The LLaVA-1.5-fork checkpoint layout both original families share (TokenPacker and VLoRA are LLaVA-1.5
forks): config keys, the LLaMA and CLIP weight names, the ignore list, vocabulary resizing, the conversion plan that
the verifier replays, CLIP configs. Each family module (`conversion/tokenpacker.py`, ...) adds its own projector or
generator names through `classify`. Never imports `modeling_tokenpacker` at import time.
"""

import importlib
import math
import os
import re
from dataclasses import asdict, dataclass, field

import torch

from .common import DTYPES, ConversionError, read_json, write_json
from .reading import SourceFile, iter_file_tensors

PROJECTOR_PREFIX = "model.mm_projector."
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # the converted vocabulary is padded to a multiple of this

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
    "mm_projector_type", "image_aspect_ratio", "mm_use_im_start_end", "mm_use_im_patch_token",
)
# Keys that carry nothing the converted model needs (training leftovers, metadata); documented in the README.
# A family adds its own.
IGNORED_CONFIG_KEYS = (
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_projector_lr", "use_mm_proj", "image_grid_pinpoints",
    "tokenizer_model_max_length", "tokenizer_padding_side", "mm_patch_merge_type", "mm_vision_tower_lr",
    "unfreeze_mm_vision_tower",
)
CLIP_VISION_CONFIG_KEYS = (
    "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout",
    "initializer_range", "initializer_factor",
)

# Weight-name mapping (the table in conversion/README.md).

LANGUAGE_MODEL_RULES = [
    (re.compile(r"model\.embed_tokens\.weight"), "model.language_model.embed_tokens.weight", "resize_vocab"),
    (re.compile(r"model\.layers\.(\d+)\.(.+)"), r"model.language_model.layers.\1.\2", None),
    (re.compile(r"model\.norm\.weight"), "model.language_model.norm.weight", None),
    (re.compile(r"lm_head\.weight"), "lm_head.weight", "resize_vocab"),
]
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


@dataclass
class Mapping:
    """What happens to one source tensor: `targets` (our names; several for a split) and `op`, or `ignored` with
    a reason. `op` None copies; "resize_vocab" pads the rows; "split_qkv" splits packed q/k/v rows; "take_rows"
    drops a leading axis of size 1 and gives target i the rows `args[i] = (start, stop, shape)`, reshaped
    row-major to `shape` (rows a family does not map are dropped: it says so)."""

    targets: tuple = ()
    op: str = None
    ignored: str = None
    args: tuple = ()


def classify_common(role, name, use_embedded_tower=True):
    """The Mapping of a LLaMA, CLIP or ignored tensor, or None for a name the family must classify (its projector
    or generator under PROJECTOR_PREFIX)."""
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
    if role == "vision":
        pattern, target = CLIP_FOLDER_RULE
        if pattern.fullmatch(name):
            return Mapping(targets=(pattern.sub(target, name),))
    return None


def unknown_tensor(role, name, detail):
    return ConversionError(
        f"Unknown tensor {name!r} in {ROLE_DESCRIPTIONS[role]}: it is neither mapped nor on the ignore list "
        f"({detail}; see conversion/README.md for the mapping). Refusing to drop it silently."
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


def check_take_rows(mapping, shape):
    """ConversionError unless a "take_rows" mapping fits a source tensor of `shape`."""
    rows, rest = (shape[1], tuple(shape[2:])) if len(shape) >= 2 and shape[0] == 1 else (None, ())
    for target, (start, stop, out_shape) in zip(mapping.targets, mapping.args):
        if rows is None or not 0 <= start < stop <= rows or math.prod(out_shape) != (stop - start) * math.prod(rest):
            raise ConversionError(f"cannot take rows {start}..{stop - 1} of a {list(shape)} tensor as {target} "
                                  f"{list(out_shape)}; expected a [1, rows, ...] tensor with those rows.")


def apply_mapping(mapping, tensor, dtype, vocab_rows):
    """The output tensors (contiguous, in `dtype`) of one mapped source tensor. A tensor already in `dtype` is not
    copied: it may stay a view of the memory-mapped source, which the streaming writer copies straight to disk."""
    if mapping.op == "take_rows":
        check_take_rows(mapping, tuple(tensor.shape))
        return [(name, tensor[0, start:stop].reshape(shape).to(dtype=dtype).contiguous())
                for name, (start, stop, shape) in zip(mapping.targets, mapping.args)]
    if mapping.op == "split_qkv":
        if tensor.shape[0] % 3:
            raise ConversionError(f"a packed q/k/v projection needs a first dimension divisible by 3; got {tuple(tensor.shape)}.")
        parts = tensor.chunk(3, dim=0)
        return [(name, part.to(dtype=dtype).contiguous()) for name, part in zip(mapping.targets, parts)]
    if mapping.op == "resize_vocab":
        return [(mapping.targets[0], resize_vocab(tensor, vocab_rows, dtype))]
    return [(mapping.targets[0], tensor.to(dtype=dtype).contiguous())]


def mapped_shapes(mapping, shape, vocab_rows):
    if mapping.op == "take_rows":
        check_take_rows(mapping, tuple(shape))
        return [(name, tuple(out_shape)) for name, (_, _, out_shape) in zip(mapping.targets, mapping.args)]
    if mapping.op == "split_qkv":
        return [(name, (shape[0] // 3,) + tuple(shape[1:])) for name in mapping.targets]
    if mapping.op == "resize_vocab":
        return [(mapping.targets[0], (vocab_rows,) + tuple(shape[1:]))]
    return [(mapping.targets[0], tuple(shape))]


@dataclass
class Plan:
    """Everything needed to reproduce the converted tensors from the source files (also read by the verifier):
    the files in order, the family (`conversion.<family>` classifies its names) with its `settings`, the dtype and
    the vocabulary rows."""

    files: list
    family: str
    dtype: str
    vocab_rows: int
    use_embedded_tower: bool
    settings: dict = field(default_factory=dict)
    image_token_id: int = None
    num_source_tensors: int = 0

    def save(self, path):
        write_json(path, {**asdict(self), "files": [asdict(item) for item in self.files]})

    @classmethod
    def load(cls, path):
        data = read_json(path)
        data["files"] = [SourceFile(**item) for item in data["files"]]
        return cls(**data)

    def classify(self, role, name):
        """The family's Mapping of one source tensor."""
        family = importlib.import_module(f"{__package__}.{self.family}")
        return family.classify(role, name, self)


def iter_converted(plan, on_tensor=None):
    """Stream the source files in order and yield (source name, Mapping, [(our name, tensor), ...]); ignored
    tensors yield an empty list. `on_tensor()` is called once per source tensor (progress)."""
    dtype = DTYPES[plan.dtype]
    for source in plan.files:
        for name, tensor in iter_file_tensors(source):
            mapping = plan.classify(source.role, name)
            outputs = [] if mapping.ignored else apply_mapping(mapping, tensor, dtype, plan.vocab_rows)
            del tensor
            if on_tensor is not None:
                on_tensor()
            yield name, mapping, outputs


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

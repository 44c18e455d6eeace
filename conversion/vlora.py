"""The VLoRA family: its perceptual weights generator's tensor names (original -> ours), the settings read from an
original `llava_vlora` config (and checked), the presets. The LLaVA-1.5 layout it shares with TokenPacker is in
conversion/llava.py. Never imports `modeling_tokenpacker` at import time.

Symbols as in the original: `T = len(vlora_type)` letters, `S = L // skip_layers` slots per letter, `d` the
generator width, `D` the LLM width, `r` the rank, `P` the feature rows, `C` the vision width.
"""

import re
from collections import OrderedDict

from .common import ConversionError, load_family_presets
from .llava import PROJECTOR_PREFIX, Mapping, classify_common, unknown_tensor

ORIGINAL_MODEL_TYPES = ("llava_vlora",)
OUR_PREFIX = "model.perceptual_weights_generator."
APPLIED_LETTERS = "qkvom"  # the keys of the original's per-layer dict: other letters are generated and ignored
NUM_HEADS = 16  # hard-coded in the original (torch.nn.MultiheadAttention(d, 16))
MLP_RATIO = 4  # hard-coded in the original (Linear(d, 4d))
LAYER_NORM_EPS = 1e-5
# Original config keys the family reads; `vlora_alpha` may be null (alpha = r) or absent (the same).
REQUIRED_KEYS = ("vlora_type", "vlora_dim", "vlora_depth", "vlora_rank", "vlora_visual_dim", "vlora_pos_num",
                 "vlora_llm_dim", "vlora_llm_depth", "weights_sep", "skip_layers")
FAMILY_CONFIG_KEYS = REQUIRED_KEYS + ("vlora_alpha", "tune_vision_tower")

# One decoder block of a sub-generator: original suffix -> ours (a tuple: the packed in_proj split by rows q; k; v).
BLOCK_NAMES = OrderedDict()
for _theirs, _ours in (("self_attn", "self_attn"), ("multihead_attn", "cross_attn")):
    BLOCK_NAMES[f"{_theirs}.in_proj_weight"] = tuple(f"{_ours}.{p}_proj.weight" for p in "qkv")
    BLOCK_NAMES[f"{_theirs}.in_proj_bias"] = tuple(f"{_ours}.{p}_proj.bias" for p in "qkv")
    BLOCK_NAMES[f"{_theirs}.out_proj.weight"] = f"{_ours}.out_proj.weight"
    BLOCK_NAMES[f"{_theirs}.out_proj.bias"] = f"{_ours}.out_proj.bias"
for _theirs, _ours in (("linear1", "fc1"), ("linear2", "fc2"), ("norm1", "self_attn_layer_norm"),
                       ("norm2", "cross_attn_layer_norm"), ("norm3", "final_layer_norm")):
    BLOCK_NAMES[f"{_theirs}.weight"] = f"{_ours}.weight"
    BLOCK_NAMES[f"{_theirs}.bias"] = f"{_ours}.bias"
# The rest of a sub-generator (`queries` is handled apart: [1, k, d] -> [k, d]).
HEAD_NAMES = OrderedDict((name, name) for name in ("norm.weight", "norm.bias", "weights_head.weight",
                                                   "weights_head.bias"))
SEPARATE = re.compile(r"gen\.(\d+)\.(.+)")
SHARED = re.compile(r"gen\.(?!\d+\.)(.+)")


def letter_plan(vlora_type):
    """`(kept, dropped)` for the letters of `vlora_type` in order: kept `[(t, letter)]` (t the sub-generator /
    row-block index in the original) for the letters the original applies, the last of a repeated letter; dropped
    `[(t, letter, why)]` for the others."""
    last = {letter: t for t, letter in enumerate(vlora_type)}
    kept, dropped = [], []
    for t, letter in enumerate(vlora_type):
        if letter not in APPLIED_LETTERS:
            dropped.append((t, letter, f"{letter!r} is not one of the targets the original applies "
                                       f"({', '.join(APPLIED_LETTERS)}); it generates the output and ignores it"))
        elif last[letter] != t:
            dropped.append((t, letter, f"{letter!r} repeats later in vlora_type and the original keeps the last "
                                       f"one (index {last[letter]})"))
        else:
            kept.append((t, letter))
    return kept, dropped


def dropped_reason(t, letter, why):
    return f"sub-generator gen.{t} (letter {letter!r}), unused by the original: {why}"


def settings_from_config(config, path):
    """The plan settings of an original config (checked): JSON-able, read back by `classify` and the verifier."""
    vlora_type = config["vlora_type"]
    if not isinstance(vlora_type, str) or not vlora_type:
        raise ConversionError(f"vlora_type must be a non-empty string of target letters; got {vlora_type!r} in {path}.")
    ints = {}
    for key in ("vlora_dim", "vlora_depth", "vlora_rank", "vlora_visual_dim", "vlora_pos_num", "vlora_llm_dim",
                "vlora_llm_depth", "skip_layers"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConversionError(f"{key} must be a positive integer; got {value!r} in {path}.")
        ints[key] = value
    depth, stride = ints["vlora_llm_depth"], ints["skip_layers"]
    if depth % stride:
        divisors = [n for n in range(1, depth + 1) if depth % n == 0]
        raise ConversionError(
            f"skip_layers={stride} does not divide vlora_llm_depth={depth}: the original's forward fails on such a "
            f"checkpoint (Bs has (T*L)//s rows, its reshape needs T*(L//s)); expected one of {divisors}.")
    width = ints["vlora_dim"]
    if width % NUM_HEADS:
        raise ConversionError(f"vlora_dim={width} is not a multiple of the {NUM_HEADS} attention heads the original "
                              "hard-codes (its torch.nn.MultiheadAttention refuses it).")
    kept, dropped = letter_plan(vlora_type)
    if not kept:
        raise ConversionError(f"vlora_type={vlora_type!r} names none of the targets the original applies "
                              f"({', '.join(APPLIED_LETTERS)}): the checkpoint changes nothing in the LLM.")
    separate = config["weights_sep"]
    if not isinstance(separate, bool):
        raise ConversionError(f"weights_sep must be true or false; got {separate!r} in {path}.")
    if dropped and not separate:
        raise ConversionError(
            f"vlora_type={vlora_type!r} with weights_sep=false: the shared sub-generator's queries of the unused "
            f"letters {[letter for _, letter, _ in dropped]} attend to (and change) the others, so the checkpoint "
            "cannot be written with the letters the original applies only.")
    return {"vlora_type": vlora_type, "weights_sep": separate, "slots": depth // stride, "width": width,
            "num_layers": ints["vlora_depth"], "rank": ints["vlora_rank"], "llm_dim": ints["vlora_llm_dim"],
            "visual_dim": ints["vlora_visual_dim"], "pos_num": ints["vlora_pos_num"],
            "kept": [[t, letter] for t, letter in kept], "dropped": [[t, letter, why] for t, letter, why in dropped]}


def sub_generators(settings):
    """`[(original prefix, t or None, number of queries)]`: one per letter (weights_sep) or one shared."""
    count, slots = len(settings["vlora_type"]), settings["slots"]
    if settings["weights_sep"]:
        return [(f"gen.{t}.", t, slots) for t in range(count)]
    return [("gen.", None, count * slots)]


def expected_shapes(settings):
    """{original name without `model.mm_projector.`: shape} of every generator tensor the config implies."""
    d, r, big_d = settings["width"], settings["rank"], settings["llm_dim"]
    count, slots = len(settings["vlora_type"]), settings["slots"]
    shapes = OrderedDict([("pos_embed", (1, settings["pos_num"], d)), ("Bs", (1, count * slots, big_d * r)),
                          ("visual_proj.weight", (d, settings["visual_dim"])), ("visual_proj.bias", (d,))])
    wide = MLP_RATIO * d
    block = {"in_proj_weight": (3 * d, d), "in_proj_bias": (3 * d,), "out_proj.weight": (d, d),
             "linear1.weight": (wide, d), "linear1.bias": (wide,), "linear2.weight": (d, wide)}
    for prefix, _, queries in sub_generators(settings):
        shapes[prefix + "queries"] = (1, queries, d)
        for n in range(settings["num_layers"]):
            for suffix in BLOCK_NAMES:  # e.g. self_attn.in_proj_weight, linear1.bias, norm2.weight
                shape = next((value for key, value in block.items() if suffix.endswith(key)), (d,))
                shapes[f"{prefix}decoders.{n}.{suffix}"] = shape
        shapes.update({prefix + "norm.weight": (d,), prefix + "norm.bias": (d,),
                       prefix + "weights_head.weight": (big_d * r, d), prefix + "weights_head.bias": (big_d * r,)})
    return shapes


def _sub_generator_target(settings, short):
    """(our sub-generator index or None if dropped, t, rest of the name) of a name under `gen.`; None if no match."""
    match = (SEPARATE if settings["weights_sep"] else SHARED).fullmatch(short)
    if match is None:
        return None
    if not settings["weights_sep"]:
        return 0, None, match.group(1)
    t = int(match.group(1))
    kept = [original for original, _ in settings["kept"]]
    return (kept.index(t) if t in kept else None), t, match.group(2)


def classify_generator(short, settings):
    """The Mapping of generator tensor `short` (name without `model.mm_projector.`), or None for an unknown name."""
    slots, width = settings["slots"], settings["width"]
    if short == "pos_embed":
        rows = settings["pos_num"]
        return Mapping(targets=(OUR_PREFIX + "position_embedding",), op="take_rows", args=((0, rows, (rows, width)),))
    if short == "Bs":
        shape = (slots, settings["llm_dim"], settings["rank"])
        return Mapping(targets=tuple(OUR_PREFIX + f"lora_B.{letter}" for _, letter in settings["kept"]),
                       op="take_rows", args=tuple((t * slots, (t + 1) * slots, shape) for t, _ in settings["kept"]))
    if short in ("visual_proj.weight", "visual_proj.bias"):
        return Mapping(targets=(OUR_PREFIX + short,))
    found = _sub_generator_target(settings, short)
    if found is None:
        return None
    index, t, rest = found
    if index is None:
        if t >= len(settings["vlora_type"]):
            return None
        _, letter, why = next(item for item in settings["dropped"] if item[0] == t)
        return Mapping(ignored=dropped_reason(t, letter, why))
    prefix = f"{OUR_PREFIX}generators.{index}."
    if rest == "queries":
        rows = slots if settings["weights_sep"] else slots * len(settings["vlora_type"])
        return Mapping(targets=(prefix + "queries",), op="take_rows", args=((0, rows, (rows, width)),))
    if rest in HEAD_NAMES:
        return Mapping(targets=(prefix + HEAD_NAMES[rest],))
    match = re.fullmatch(r"decoders\.(\d+)\.(.+)", rest)
    if match is None or int(match.group(1)) >= settings["num_layers"] or match.group(2) not in BLOCK_NAMES:
        return None
    ours = BLOCK_NAMES[match.group(2)]
    layer = f"{prefix}layers.{match.group(1)}."
    if isinstance(ours, tuple):
        return Mapping(targets=tuple(layer + name for name in ours), op="split_qkv")
    return Mapping(targets=(layer + ours,))


def classify(role, name, plan):
    """The Mapping of source tensor `name` of a file with `role` under `plan`; ConversionError for a name nobody
    knows."""
    mapping = classify_common(role, name, plan.use_embedded_tower)
    if mapping is not None:
        return mapping
    if role in ("checkpoint", "projector") and name.startswith(PROJECTOR_PREFIX):
        mapping = classify_generator(name[len(PROJECTOR_PREFIX):], plan.settings)
        if mapping is not None:
            return mapping
    raise unknown_tensor(role, name, f"VLoRA generator of vlora_type {plan.settings.get('vlora_type')!r}, "
                                     f"weights_sep={plan.settings.get('weights_sep')}")


def validate_original_config(config, path):
    """Check `config` is an original VLoRA (`llava_vlora`) config.json; ConversionError otherwise."""
    if not isinstance(config, dict):
        raise ConversionError(f"{path} must hold a JSON object; got {type(config).__name__}.")
    model_type = config.get("model_type")
    if "text_config" in config or model_type == "vlora":
        raise ConversionError(f"{path} is already a transformers-format config (model_type {model_type!r} with a "
                              f"nested text_config); expected an original VLoRA config (model_type 'llava_vlora').")
    if model_type not in ORIGINAL_MODEL_TYPES:
        raise ConversionError(f"{path} is not an original VLoRA config: expected model_type in {ORIGINAL_MODEL_TYPES} "
                              f"(architectures LlavaLlamaVLoRAForCausalLM); got model_type {model_type!r}.")
    missing = [key for key in REQUIRED_KEYS + ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                              "intermediate_size") if key not in config]
    if missing:
        raise ConversionError(f"{path} lacks the keys {missing} that the original's training writes and its model "
                              "reads.")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(key):
            raise ConversionError(f"{key}=true is not supported (VLoRA trains with false); got {config[key]!r} in "
                                  f"{path}.")


# -- presets ---------------------------------------------------------------------------------------------------

def load_presets():
    """{name: preset dict} of the VLoRA family (`"family": "vlora"`) from configuration/*.json."""
    return load_family_presets("vlora")


def get_preset(name):
    presets = load_presets()
    for key, preset in presets.items():
        if key.lower() == str(name).lower():
            return preset
    raise ConversionError(f"Unknown VLoRA preset {name!r}; available: {sorted(presets)}.")


def preset_differences(preset, config):
    """`(architecture, settings)`: [(key, preset value, checkpoint value)] where the checkpoint's LLM architecture
    contradicts the preset's `text_config`, and where its vlora_* settings differ from the preset's `vlora` values
    (which are expectations, unverified when the preset says `"verified": false`)."""
    architecture = [(key, value, config.get(key)) for key, value in preset["text_config"].items()
                    if key in config and config[key] != value]
    settings = [(key, value, config.get(key)) for key, value in preset.get("vlora", {}).items()
                if key in config and config[key] != value]
    return architecture, settings


def match_presets(config):
    """Names of the presets whose LLM architecture the checkpoint has."""
    return [name for name, preset in load_presets().items() if not preset_differences(preset, config)[0]]

"""The TokenPacker family: its projector's weight names (original -> ours), the presets of the released
checkpoints, and the checks of an original TokenPacker / LLaVA-1.5 config. The LLaVA-1.5 layout it shares with other
families is in conversion/llava.py. Never imports `modeling_tokenpacker` at import time.
"""

from collections import OrderedDict
from pathlib import Path

from .common import ConversionError, load_family_presets, read_json
from .llava import PROJECTOR_PREFIX, Mapping, classify_common, unknown_tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESSOR_PRESET_DIR = REPO_ROOT / "processing" / "presets"
ORIGINAL_MODEL_TYPES = ("llava", "llava_llama")
DEFAULT_REGION_FEATURE_LAYERS = [12, 16, 22, 23]  # hard-coded in the original (multi-level CLIP features)

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

def classify(role, name, plan):
    """The Mapping of source tensor `name` of a file with `role` under `plan` (its `settings["projector_type"]`);
    ConversionError for a name nobody knows."""
    mapping = classify_common(role, name, plan.use_embedded_tower)
    if mapping is not None:
        return mapping
    projector_type = plan.settings.get("projector_type")
    if role in ("checkpoint", "projector") and name.startswith(PROJECTOR_PREFIX):
        short = name[len(PROJECTOR_PREFIX):]
        names = PROJECTOR_NAMES.get(projector_type, {})
        if short in names:
            target = names[short]
            if isinstance(target, tuple):
                return Mapping(targets=tuple(OUR_PROJECTOR_PREFIX + t for t in target), op="split_qkv")
            return Mapping(targets=(OUR_PROJECTOR_PREFIX + target,))
    raise unknown_tensor(role, name, f"projector type {projector_type!r}")


def load_presets():
    """{name: preset dict} of the TokenPacker family from configuration/*.json (other families say `family`)."""
    return load_family_presets("tokenpacker")


def processor_preset(name):
    """The processor preset (processing/presets/NAME.json) of a released family: image-processor settings,
    `image_seq_length`, chat template; None for a family without one."""
    path = PROCESSOR_PRESET_DIR / f"{name}.json"
    return read_json(path) if path.is_file() else None


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



"""TokenPacker configuration.

Shipped inside checkpoints as remote code: imports only transformers and nothing of this package
but sibling modules, and works from transformers 4.46 to 5.x (see design.md §5).
"""

from transformers import AutoConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

PROJECTOR_TYPES = ("tokenpacker", "mlp2x_gelu", "avg_pool", "resampler")

# One class holds one auto class, so the full map is written explicitly (design.md §5).
AUTO_MAP = {
    "AutoConfig": "configuration_tokenpacker.TokenPackerConfig",
    "AutoModel": "modeling_tokenpacker.TokenPackerModel",
    "AutoModelForCausalLM": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_tokenpacker.TokenPackerForConditionalGeneration",
}
VISION_FEATURE_SELECT_STRATEGIES = ("default", "full")
# Maximum block counts TokenPacker-HD ('slice' mode) has candidate grid tables for.
SLICE_PATCH_NUMS = (9, 16, 25)

# CLIP ViT-L/14 at 336 px, the vision tower of every released TokenPacker checkpoint.
DEFAULT_VISION_CONFIG = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# Vicuna-7B (LLaMA-2 7B) with LLaVA's `<image>` token and a pad token appended (32000 + 2 rows).
DEFAULT_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32064,
    "pad_token_id": 32001,
}


def _build_sub_config(value, defaults, name):
    """A sub-config from `None` (defaults), a dict with a `model_type`, or a config object.

    Built by hand through `CONFIG_MAPPING` because transformers 4.x has none of 5.x's sub-config helpers.
    """
    if value is None:
        value = dict(defaults)
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict, a PretrainedConfig or None; got {type(value).__name__}.")
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"`{name}` given as a dict needs a `model_type` key (e.g. {defaults['model_type']!r}).")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"`{name}` has model_type {model_type!r}, which this transformers version does not know.")
    return CONFIG_MAPPING[model_type](**value)


class TokenPackerConfig(PretrainedConfig):
    r"""Configuration of a TokenPacker multimodal model: a vision tower, a TokenPacker (or MLP) projector and a
    causal language model.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            The vision tower's config (CLIP ViT-L/14-336 by default). A dict needs a `model_type`.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            The language model's config (Vicuna-7B dims by default). A dict needs a `model_type`.
        projector_type (`str`, *optional*, defaults to `"tokenpacker"`):
            `"tokenpacker"` (region-to-point injection), `"mlp2x_gelu"` (LLaVA-1.5's projector, all tokens kept), or
            a naive compression to TokenPacker's budget for comparison: `"avg_pool"` (each `s x s` region averaged,
            then the MLP) or `"resampler"` (`(g/s)^2` learned queries attending over every patch, then the MLP).
        scale_factor (`int`, *optional*, defaults to 2):
            Down-sampling factor `s` of the patch grid: a `g x g` grid becomes `(g/s) x (g/s)` point queries, each
            attending to its own `s x s` region. 2, 3 and 4 give 144, 64 and 36 tokens for a 24 x 24 grid.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden state of the vision tower that gives the point queries (and the `mlp2x_gelu` input).
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`):
            `"default"` drops the CLS token, `"full"` keeps it (only for `mlp2x_gelu`: the region grid needs a
            square number of tokens).
        region_feature_layers (`list[int]`, *optional*, defaults to `[12, 16, 22, 23]`):
            Hidden states concatenated on channels to give the regions' keys and values (multi-level features).
        projector_hidden_size (`int`, *optional*, defaults to 1024):
            Width `E` of the projector's attention.
        projector_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the projector; must divide `projector_hidden_size`.
        projector_layer_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the projector's query/key/value LayerNorms.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the projector's MLPs (exact GELU in the original).
        image_token_id (`int`, *optional*, defaults to 32000):
            Id of the `<image>` placeholder token, one per visual token in `input_ids`.
        image_seq_length (`int`, *optional*):
            Accepted for symmetry with the processor and checked: the projector determines the visual tokens per
            block (`grid_size**2 / scale_factor**2`, or every patch for `mlp2x_gelu`).
        image_aspect_ratio (`str`, *optional*, defaults to `"pad"`):
            Preprocessing mode the checkpoint was trained with: `"pad"`, `"slice"` (TokenPacker-HD) or another
            value for a plain resize and centre crop. Informational for the model; the image processor acts on it.
        patch_num (`int`, *optional*, defaults to 9):
            Maximum number of blocks in `"slice"` mode: 9, 16 or 25 (checked when `image_aspect_ratio="slice"`).
    """

    model_type = "tokenpacker"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        projector_type="tokenpacker",
        scale_factor=2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        region_feature_layers=(12, 16, 22, 23),
        projector_hidden_size=1024,
        projector_num_heads=8,
        projector_layer_norm_eps=1e-6,
        projector_hidden_act="gelu",
        image_token_id=32000,
        image_seq_length=None,
        image_aspect_ratio="pad",
        patch_num=9,
        tie_word_embeddings=False,
        **kwargs,
    ):
        # 4.x configs saved with `image_token_index` (LLaVA's older name) still load.
        image_token_id = kwargs.pop("image_token_index", image_token_id)
        self.vision_config = _build_sub_config(vision_config, DEFAULT_VISION_CONFIG, "vision_config")
        self.text_config = _build_sub_config(text_config, DEFAULT_TEXT_CONFIG, "text_config")
        self.projector_type = projector_type
        self.scale_factor = int(scale_factor)
        self.vision_feature_layer = int(vision_feature_layer)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.region_feature_layers = [int(layer) for layer in region_feature_layers]
        self.projector_hidden_size = int(projector_hidden_size)
        self.projector_num_heads = int(projector_num_heads)
        self.projector_layer_norm_eps = float(projector_layer_norm_eps)
        self.projector_hidden_act = projector_hidden_act
        self.image_token_id = int(image_token_id)
        self.image_aspect_ratio = image_aspect_ratio
        self.patch_num = int(patch_num)
        self._validate()
        if image_seq_length is not None and int(image_seq_length) != self.image_seq_length:
            raise ValueError(
                f"image_seq_length={image_seq_length} contradicts the projector, which gives "
                f"{self.image_seq_length} tokens per image ({self.projector_type}, grid {self.grid_size}, "
                f"scale_factor {self.scale_factor})."
            )
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def grid_size(self):
        """Patches per side of the vision tower's grid (`image_size // patch_size`, 24 for CLIP-L/336)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def image_seq_length(self):
        """Visual tokens the projector gives per 336-px block (144, 64, 36 for scale 2, 3, 4 on a 24 x 24 grid)."""
        if self.projector_type == "mlp2x_gelu":
            return self.grid_size**2 + (1 if self.vision_feature_select_strategy == "full" else 0)
        return (self.grid_size // self.scale_factor) ** 2

    def _validate(self):
        if self.image_aspect_ratio == "slice" and self.patch_num not in SLICE_PATCH_NUMS:
            raise ValueError(
                f"patch_num must be one of {SLICE_PATCH_NUMS} with image_aspect_ratio='slice' (TokenPacker-HD's "
                f"block grid tables); got {self.patch_num}."
            )
        if self.projector_type not in PROJECTOR_TYPES:
            raise ValueError(f"projector_type must be one of {PROJECTOR_TYPES}; got {self.projector_type!r}.")
        if self.vision_feature_select_strategy not in VISION_FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {VISION_FEATURE_SELECT_STRATEGIES}; "
                f"got {self.vision_feature_select_strategy!r}."
            )
        depth = self.vision_config.num_hidden_layers
        # hidden_states has depth + 1 entries: index 0 is the embedding output.
        for name, layer in [("vision_feature_layer", self.vision_feature_layer)] + [
            ("region_feature_layers", layer) for layer in self.region_feature_layers
        ]:
            if not -(depth + 1) <= layer <= depth:
                raise ValueError(
                    f"{name} contains {layer}, outside the vision tower's hidden states: expected an index in "
                    f"[{-(depth + 1)}, {depth}] for {depth} layers."
                )
        if self.projector_type == "mlp2x_gelu":
            return
        if self.projector_type == "tokenpacker" and not self.region_feature_layers:
            raise ValueError("region_feature_layers must name at least one vision layer; got an empty list.")
        if self.scale_factor < 1 or self.grid_size % self.scale_factor:
            raise ValueError(
                f"scale_factor must be a positive divisor of the vision grid size {self.grid_size} "
                f"(image_size {self.vision_config.image_size} / patch_size {self.vision_config.patch_size}); "
                f"got {self.scale_factor}."
            )
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                f"The {self.projector_type} projector needs the patch grid without the CLS token: "
                f"vision_feature_select_strategy must be 'default'; got {self.vision_feature_select_strategy!r}."
            )
        if self.projector_num_heads < 1 or self.projector_hidden_size % self.projector_num_heads:
            raise ValueError(
                f"projector_num_heads must divide projector_hidden_size; got {self.projector_num_heads} heads "
                f"for width {self.projector_hidden_size}."
            )

    def to_dict(self):
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output

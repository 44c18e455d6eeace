"""VLoRA configuration.

Shipped inside checkpoints as remote code: imports only transformers and sibling modules, and works from
transformers 4.46 to 5.x (see design.md §5).
"""

from transformers import AutoConfig, PretrainedConfig

from .configuration_tokenpacker import DEFAULT_VISION_CONFIG, _build_sub_config

# One class holds one auto class, so the full map is written explicitly (design.md §5).
AUTO_MAP = {
    "AutoConfig": "configuration_vlora.VLoRAConfig",
    "AutoModel": "modeling_vlora.VLoRAModel",
    "AutoModelForCausalLM": "modeling_vlora.VLoRAForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vlora.VLoRAForConditionalGeneration",
    "AutoModelForVision2Seq": "modeling_vlora.VLoRAForConditionalGeneration",
}

# The linear maps a delta can target (the paper's q, k, v, o and the parallel MLP branch m) and where each sits in a
# decoder layer of LLaMA, Mistral, Qwen2 and most causal LMs of transformers: m wraps the whole MLP.
DELTA_TARGETS = "qkvom"
DEFAULT_DELTA_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                         "o": "self_attn.o_proj", "m": "mlp"}
GENERATION_POSITIONS = ("full_forward", "original")

# Vicuna-7B-v1.5 (LLaMA-2 7B), VLoRA's language model; the vocabulary is not extended (the image placeholder is an
# id outside it, see `image_token_id`).
DEFAULT_TEXT_CONFIG = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "vocab_size": 32000,
    "pad_token_id": 0,
}


class VLoRAConfig(PretrainedConfig):
    r"""Configuration of a VLoRA model: a vision tower, a perceptual weights generator and a causal language model
    whose linear maps receive per-image low-rank deltas; the prompt carries one placeholder position per image and
    no visual tokens.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*): the vision tower (CLIP ViT-L/14-336 by default).
        text_config (`dict` or `PretrainedConfig`, *optional*): the language model (Vicuna-7B dims by default).
        vision_feature_layer (`int`, *optional*, defaults to -2): hidden state of the tower the generator reads.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"default"`): `"default"` drops the CLS token,
            `"full"` keeps it (the generator's position embeddings then have one more row).
        generator_hidden_size (`int`, *optional*, defaults to 512): width `d` of the generator.
        generator_num_layers (`int`, *optional*, defaults to 8): decoder blocks `N` of each sub-generator.
        generator_num_heads (`int`, *optional*, defaults to 16): attention heads of the blocks; must divide `d`.
        generator_mlp_ratio (`int`, *optional*, defaults to 4): the blocks' MLP width is `ratio * d`.
        generator_layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the generator's LayerNorms.
        lora_rank (`int`, *optional*, defaults to 64): rank `r` of every delta.
        lora_alpha (`float`, *optional*): the deltas are scaled by `alpha / r`; None means `alpha = r` (scale 1).
        delta_targets (`str`, *optional*, defaults to `"qkvom"`): which maps get deltas, letters of `qkvom` in the
            order of the generator's outputs: q, k, v, o the attention projections, m a parallel branch around the
            whole MLP (`mlp(x) + x A Bᵀ`).
        layer_stride (`int`, *optional*, defaults to 4): layer `i` (0-based) of the language model gets deltas iff
            `(i + 1) % layer_stride == 0`, from slot `i // layer_stride`; must divide the number of layers.
        separate_generators (`bool`, *optional*, defaults to True): one sub-generator per target letter (with
            `L / layer_stride` queries each) or one shared sub-generator (with `len(delta_targets) * L / stride`).
        delta_modules (`dict`, *optional*): `{letter: path inside a decoder layer}` of the module each target patches
            (`DEFAULT_DELTA_MODULES`: `self_attn.q_proj` ... and `mlp`); the language model's decoder layers are its
            `layers` list.
        image_token_id (`int`, *optional*, defaults to 32000): id of the `<image>` placeholder in `input_ids` (one per
            image). It need not be in the language model's vocabulary: the placeholder position is embedded as
            `image_token_embedding_id` and no query attends to it.
        image_token_embedding_id (`int`, *optional*, defaults to 0): the vocabulary id whose embedding fills the
            placeholder position (the original replaces the placeholder by id 0, `<unk>`).
        generation_positions (`str`, *optional*, defaults to `"full_forward"`): position ids of decoded tokens in
            `generate`. `"full_forward"`: as in a forward over the whole sequence (the placeholder counts; the
            convention the model was trained with, so greedy `generate` equals step-by-step recomputation).
            `"original"`: the original `generate`'s rule, one less for every decoded token of a prompt with an image,
            to reproduce its tokens exactly. `generate(..., generation_positions=...)` overrides it per call.
        image_aspect_ratio (`str`, *optional*, defaults to `"pad"`): preprocessing the checkpoint was trained with
            (`"pad"` letterboxes onto the mean colour; other values resize and crop). Read by the image processor.
    """

    model_type = "vlora"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config=None,
        text_config=None,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        generator_hidden_size=512,
        generator_num_layers=8,
        generator_num_heads=16,
        generator_mlp_ratio=4,
        generator_layer_norm_eps=1e-5,
        lora_rank=64,
        lora_alpha=None,
        delta_targets=DELTA_TARGETS,
        layer_stride=4,
        separate_generators=True,
        delta_modules=None,
        image_token_id=32000,
        image_token_embedding_id=0,
        generation_positions="full_forward",
        image_aspect_ratio="pad",
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vision_config = _build_sub_config(vision_config, DEFAULT_VISION_CONFIG, "vision_config")
        self.text_config = _build_sub_config(text_config, DEFAULT_TEXT_CONFIG, "text_config")
        self.vision_feature_layer = int(vision_feature_layer)
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.generator_hidden_size = int(generator_hidden_size)
        self.generator_num_layers = int(generator_num_layers)
        self.generator_num_heads = int(generator_num_heads)
        self.generator_mlp_ratio = int(generator_mlp_ratio)
        self.generator_layer_norm_eps = float(generator_layer_norm_eps)
        self.lora_rank = int(lora_rank)
        self.lora_alpha = None if lora_alpha is None else float(lora_alpha)
        self.delta_targets = delta_targets
        self.layer_stride = int(layer_stride)
        self.separate_generators = bool(separate_generators)
        self.delta_modules = {**DEFAULT_DELTA_MODULES, **dict(delta_modules or {})}
        self.image_token_id = int(image_token_id)
        self.image_token_embedding_id = int(image_token_embedding_id)
        self.generation_positions = generation_positions
        self.image_aspect_ratio = image_aspect_ratio
        self._validate()
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def lora_scaling(self):
        """`alpha / r`, the factor on every B (1 when `lora_alpha` is None)."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.lora_rank

    @property
    def num_slots(self):
        """Patched layers `S = L / layer_stride` (slots per target letter)."""
        return self.text_config.num_hidden_layers // self.layer_stride

    @property
    def patched_layers(self):
        """0-based indices of the language model's layers that get deltas: `(i + 1) % layer_stride == 0`."""
        return [i for i in range(self.text_config.num_hidden_layers) if (i + 1) % self.layer_stride == 0]

    @property
    def num_visual_features(self):
        """Rows of the tower's features the generator reads (patches, plus CLS with the "full" strategy)."""
        grid = self.vision_config.image_size // self.vision_config.patch_size
        return grid * grid + (1 if self.vision_feature_select_strategy == "full" else 0)

    def delta_shape(self, letter):
        """`(in_features, out_features)` of the map target `letter` patches, from the text config (heads of
        `head_dim`, grouped key/value heads)."""
        text = self.text_config
        hidden = text.hidden_size
        head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
        heads = text.num_attention_heads * head_dim
        kv_heads = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
        return {"q": (hidden, heads), "k": (hidden, kv_heads), "v": (hidden, kv_heads), "o": (heads, hidden),
                "m": (hidden, hidden)}[letter]

    def _validate(self):
        targets = self.delta_targets
        if not isinstance(targets, str) or not targets:
            raise ValueError(f"delta_targets must be a non-empty string of letters from {DELTA_TARGETS!r}; "
                             f"got {targets!r}.")
        unknown = sorted(set(targets) - set(DELTA_TARGETS))
        if unknown:
            raise ValueError(f"delta_targets may only hold the letters {DELTA_TARGETS!r} (q, k, v, o projections, m "
                             f"the MLP branch); got {targets!r} with {unknown}.")
        if len(set(targets)) != len(targets):
            raise ValueError(f"delta_targets names a letter twice: {targets!r}; each target gets one set of deltas.")
        missing = sorted(set(targets) - set(self.delta_modules))
        if missing:
            raise ValueError(f"delta_modules has no module path for the targets {missing}; got {self.delta_modules}.")
        depth = self.text_config.num_hidden_layers
        if self.layer_stride < 1 or depth % self.layer_stride:
            raise ValueError(f"layer_stride must be a positive divisor of the language model's {depth} layers; got "
                             f"{self.layer_stride}.")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be a positive integer; got {self.lora_rank}.")
        width, heads = self.generator_hidden_size, self.generator_num_heads
        if width < 1 or heads < 1 or width % heads:
            raise ValueError(f"generator_num_heads must divide generator_hidden_size; got {heads} heads for width "
                             f"{width}.")
        if self.generator_num_layers < 1 or self.generator_mlp_ratio < 1:
            raise ValueError("generator_num_layers and generator_mlp_ratio must be positive; got "
                             f"{self.generator_num_layers} and {self.generator_mlp_ratio}.")
        if not self.separate_generators and len({self.delta_shape(letter)[0] for letter in targets}) > 1:
            raise ValueError("A shared generator (separate_generators=False) gives every target A of one input "
                             f"width, but the targets {targets!r} have inputs of widths "
                             f"{sorted({self.delta_shape(letter)[0] for letter in targets})}.")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("vision_feature_select_strategy must be 'default' or 'full'; got "
                             f"{self.vision_feature_select_strategy!r}.")
        tower_depth = self.vision_config.num_hidden_layers
        if not -(tower_depth + 1) <= self.vision_feature_layer <= tower_depth:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is outside the vision tower's hidden "
                             f"states: expected an index in [{-(tower_depth + 1)}, {tower_depth}].")
        if self.generation_positions not in GENERATION_POSITIONS:
            raise ValueError(f"generation_positions must be one of {GENERATION_POSITIONS}; got "
                             f"{self.generation_positions!r}.")
        if not 0 <= self.image_token_embedding_id < self.text_config.vocab_size:
            raise ValueError(f"image_token_embedding_id must be an id of the language model's vocabulary [0, "
                             f"{self.text_config.vocab_size}); got {self.image_token_embedding_id}.")

    def to_dict(self):
        output = super().to_dict()
        for key in ("vision_config", "text_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if isinstance(value, PretrainedConfig) else value
        return output

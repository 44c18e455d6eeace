"""TokenPacker: a vision tower, a region-to-point projector and a causal language model.

Shipped inside checkpoints as remote code: imports only torch, transformers and sibling modules, and works from
transformers 4.46 to 5.x (see design.md §5; version-dependent spots are marked "4.x/5.x").
"""

import copy
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_tokenpacker import AUTO_MAP, TokenPackerConfig

IGNORE_INDEX = -100

# Modules bitsandbytes leaves in the compute dtype unless the user's config names its own skip list. Both name
# styles: 5.x matches a name from the root or as a suffix, 4.x by substring.
MODULES_NOT_TO_QUANTIZE = [
    "vision_tower",
    "model.vision_tower",
    "multi_modal_projector",
    "model.multi_modal_projector",
    "lm_head",
]


@dataclass
class TokenPackerModelOutputWithPast(BaseModelOutputWithPast):
    """Output of `TokenPackerModel`: the language model's fields, as the installed transformers declares them (the
    KV cache is `past_key_values` up to 5.23 and `cache` from 5.24), plus

    Args:
        image_hidden_states: `[num_blocks, image_seq_length, hidden]`, the packed visual tokens that were scattered
            into the image-token positions (None when no pixel values were given).
    """

    image_hidden_states: Optional[torch.FloatTensor] = None


@dataclass
class TokenPackerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Output of `TokenPackerForConditionalGeneration`: transformers' causal-LM fields (`loss` ignores image
    positions; `logits` `[batch, seq_len, vocab]` or the last `logits_to_keep` positions), plus

    Args:
        image_hidden_states: as in `TokenPackerModelOutputWithPast`.
    """

    image_hidden_states: Optional[torch.FloatTensor] = None


def _build_output(output_class, source, **values):
    """`output_class` from the fields of `source` (another ModelOutput) that it declares, plus `values`. Copying by
    the installed release's own field names keeps the cache field's name out of this code."""
    names = {field.name for field in dataclasses.fields(output_class)}
    return output_class(**{key: value for key, value in source.items() if key in names}, **values)


class TokenPackerMLP(nn.Module):
    """Two linear layers with an activation between: `[..., in_features]` -> `[..., out_features]`.

    As a projector of its own (`projector_type="mlp2x_gelu"`) this is LLaVA-1.5's projector.
    """

    def __init__(self, in_features, out_features, hidden_act="gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[hidden_act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, hidden_states):
        return self.linear_2(self.act(self.linear_1(hidden_states)))


class TokenPackerRegionAttention(nn.Module):
    """Multi-head attention of each point query over its own region, `torch.nn.MultiheadAttention` semantics
    (projections with bias, no dropout), vectorised over batch and regions.

    Each region has a single query, which allows moving the key and value projections onto the query side
    (`absorbed_attention`): the same result for a fraction of the work. That path reads `k_proj`/`v_proj` weights
    directly, so it is taken only when both are plain `nn.Linear` layers; anything that replaces or wraps them (a
    PEFT adapter, a quantized layer, a parametrization, a hook, accelerate offloading) gets `projected_attention`,
    which calls the modules and `F.scaled_dot_product_attention`.
    """

    def __init__(self, embed_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, query, key, value):
        """query `[B, Q, E]`; key, value `[B, Q, R, E]` (R = region size) -> `[B, Q, E]`."""
        if self.projections_can_be_absorbed():
            attended = self.absorbed_attention(query, key, value)
        else:
            attended = self.projected_attention(query, key, value)
        return self.out_proj(attended)

    def projections_can_be_absorbed(self):
        """Whether `k_proj` and `v_proj` are plain, materialised `nn.Linear` layers with nothing hooked into them."""
        return all(
            type(proj) is nn.Linear
            and not (proj._forward_hooks or proj._forward_pre_hooks or hasattr(proj, "_hf_hook"))
            and proj.weight.device.type != "meta"
            for proj in (self.k_proj, self.v_proj)
        )

    def projected_attention(self, query, key, value):
        """Project every key and value, then attend: `[B, Q, E]`, `[B, Q, R, E]` x 2 -> `[B, Q, E]` (heads merged,
        before `out_proj`)."""
        batch, num_queries, region, embed_dim = key.shape
        rows = batch * num_queries
        q = self.q_proj(query).reshape(rows, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).reshape(rows, region, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).reshape(rows, region, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [rows, heads, 1, head_dim]
        return out.transpose(1, 2).reshape(batch, num_queries, embed_dim)

    def absorbed_attention(self, query, key, value):
        """`projected_attention` with the key and value projections applied on the query side. Per head h:
        `q_h . (W_kh k + b_kh) = (W_khᵀ q_h) . k + q_h . b_kh`, whose last term is the same for every key of the
        region and cancels in the softmax; `sum_r p_r (W_vh v_r + b_vh) = W_vh (sum_r p_r v_r) + b_vh` because the
        weights p sum to one. The projections then cost one E x E product per query instead of one per key
        (R = s^2 keys per query). Shapes as in `projected_attention`."""
        batch, num_queries, _, embed_dim = key.shape
        q = self.q_proj(query).reshape(batch, num_queries, self.num_heads, self.head_dim) * self.head_dim**-0.5
        w_k = self.k_proj.weight.reshape(self.num_heads, self.head_dim, embed_dim)
        w_v = self.v_proj.weight.reshape(self.num_heads, self.head_dim, embed_dim)
        q_in_key_space = torch.einsum("bqhd,hde->bqhe", q, w_k)
        scores = torch.matmul(q_in_key_space, key.transpose(-1, -2))  # [B, Q, heads, R]
        if self.k_proj.bias is not None:
            # Cancels in the softmax; kept so that every parameter is in the graph (DDP expects it).
            scores = scores + (q * self.k_proj.bias.reshape(self.num_heads, self.head_dim)).sum(-1, keepdim=True)
        weights = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(value.dtype)
        pooled = torch.matmul(weights, value)  # [B, Q, heads, E]: each head's weighted mean of the raw values
        out = torch.einsum("bqhe,hde->bqhd", pooled, w_v)
        if self.v_proj.bias is not None:
            out = out + self.v_proj.bias.reshape(self.num_heads, self.head_dim)
        return out.reshape(batch, num_queries, embed_dim)


class TokenPackerProjector(nn.Module):
    """Region-to-point injection (TokenPacker, arXiv 2407.02392).

    The point queries are the patch features bilinearly down-sampled from a `g x g` grid to `g' x g'`
    (`g' = g / scale_factor`); each query attends to the `s x s` multi-level features of its own region.

    Widths: C (vision hidden), L (number of region feature layers), E (projector width), H (LLM hidden).
    """

    def __init__(self, config: TokenPackerConfig):
        super().__init__()
        vision_width = config.vision_config.hidden_size
        region_width = vision_width * len(config.region_feature_layers)
        embed_dim = config.projector_hidden_size
        eps = config.projector_layer_norm_eps
        self.grid_size = config.grid_size
        self.scale_factor = config.scale_factor
        self.query_grid_size = config.grid_size // config.scale_factor

        self.query_proj = nn.Linear(vision_width, embed_dim, bias=False)
        self.query_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.key_mlp = TokenPackerMLP(region_width, embed_dim, config.projector_hidden_act)
        self.key_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.value_mlp = TokenPackerMLP(region_width, embed_dim, config.projector_hidden_act)
        self.value_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.attention = TokenPackerRegionAttention(embed_dim, config.projector_num_heads)
        self.output_mlp = TokenPackerMLP(embed_dim, config.text_config.hidden_size, config.projector_hidden_act)

    def point_queries(self, image_features):
        """`[B, g*g, C]` -> `[B, g'*g', C]`: bilinear down-sampling (align_corners=False) computed in float32 and
        cast back, as the original does. For integer factors this is not an average pool (s=3 picks centres)."""
        batch, _, channels = image_features.shape
        grid = image_features.reshape(batch, self.grid_size, self.grid_size, channels).permute(0, 3, 1, 2)
        size = (self.query_grid_size, self.query_grid_size)
        queries = F.interpolate(grid.float(), size=size, mode="bilinear", align_corners=False)
        return queries.permute(0, 2, 3, 1).reshape(batch, -1, channels).to(image_features.dtype)

    def group_regions(self, features):
        """`[B, g*g, E]` (row-major grid) -> `[B, g'*g', s*s, E]`: query (i, j) gets rows i*s..i*s+s-1 and columns
        j*s..j*s+s-1 of the grid, row-major within the region."""
        batch, _, width = features.shape
        s, n = self.scale_factor, self.query_grid_size
        features = features.reshape(batch, n, s, n, s, width).permute(0, 1, 3, 2, 4, 5)
        return features.reshape(batch, n * n, s * s, width)

    def forward(self, image_features, region_features):
        """image_features `[B, g*g, C]` (point-query layer), region_features `[B, g*g, L*C]` -> `[B, g'*g', H]`."""
        query = self.query_norm(self.query_proj(self.point_queries(image_features)))
        key = self.group_regions(self.key_norm(self.key_mlp(region_features)))
        value = self.group_regions(self.value_norm(self.value_mlp(region_features)))
        return self.output_mlp(self.attention(query, key, value))


def build_projector(config: TokenPackerConfig):
    """The projector named by `config.projector_type`."""
    if config.projector_type == "mlp2x_gelu":
        return TokenPackerMLP(
            config.vision_config.hidden_size, config.text_config.hidden_size, config.projector_hidden_act
        )
    return TokenPackerProjector(config)


def _inner_vision_model(tower):
    """`CLIPVisionModel` wraps a `vision_model` up to transformers 5.5 and has none from 5.6. Keeping the inner
    transformer gives the same weight names (`model.vision_tower.encoder...`) in every release, so checkpoints load
    across versions."""
    return getattr(tower, "vision_model", tower)


def _floating_dtype(module):
    """dtype of the first floating-point parameter (a quantized module also holds integer weights)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def _with_default_quantization_skips(quantization_config):
    """A copy of a bitsandbytes config (object or dict) whose unset `llm_int8_skip_modules` becomes
    MODULES_NOT_TO_QUANTIZE, so only the language model's linear layers are quantized by default."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        if quantization_config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return quantization_config
        if quantization_config.get("llm_int8_skip_modules") is None:
            return {**quantization_config, "llm_int8_skip_modules": list(MODULES_NOT_TO_QUANTIZE)}
        return quantization_config
    if getattr(quantization_config, "llm_int8_skip_modules", False) is None:
        quantization_config = copy.deepcopy(quantization_config)
        quantization_config.llm_int8_skip_modules = list(MODULES_NOT_TO_QUANTIZE)
    return quantization_config


def _is_prefill_step(generation_kwargs):
    """Whether this generation step must see the pixel values: the first step of a new input, or every step
    without a cache. `generation_kwargs` are those `generate` hands to `prepare_inputs_for_generation`.

    5.x says `is_first_iteration=True` on the prefill step (5.24 passes nothing on decode steps); every release
    passes the KV cache, under its own name (`past_key_values` up to 5.23, `cache` from 5.24), which is found by
    type here: an empty cache, or none yet, also means the first step.
    """
    if generation_kwargs.get("use_cache") is False or generation_kwargs.get("is_first_iteration"):
        return True
    cache = next((value for value in generation_kwargs.values() if isinstance(value, Cache)), None)
    return cache is None or cache.get_seq_length() == 0


def blocks_per_image(image_grids):
    """Blocks of each image of TokenPacker-HD ('slice') pixel values: `rows*cols`, plus the global view when
    `rows*cols > 1`. image_grids `[num_images, 2]` (rows, cols) -> int64 `[num_images]`."""
    blocks = image_grids[:, 0] * image_grids[:, 1]
    return blocks + (blocks > 1).to(blocks.dtype)


def check_image_grids(image_grids, pixel_values):
    """`image_grids` as an int64 `[num_images, 2]` tensor after checking it describes `pixel_values` (ValueError)."""
    if pixel_values is None:
        raise ValueError("image_grids describe the blocks of pixel_values; pass pixel_values with them.")
    grids = torch.as_tensor(image_grids, device="cpu")
    if grids.is_floating_point() or grids.is_complex() or grids.ndim != 2 or grids.shape[-1] != 2:
        raise ValueError(
            f"image_grids must be integers of shape [num_images, 2] (rows, cols per image); got dtype {grids.dtype}, "
            f"shape {list(grids.shape)}."
        )
    grids = grids.to(torch.int64)
    if bool((grids < 1).any()):
        raise ValueError(f"image_grids need at least 1 row and 1 column per image; got {grids.tolist()}.")
    expected = int(blocks_per_image(grids).sum())
    if expected != pixel_values.shape[0]:
        raise ValueError(
            f"image_grids {grids.tolist()} describe {expected} blocks (rows*cols per image, +1 global view when "
            f"rows*cols > 1) but pixel_values has {pixel_values.shape[0]}."
        )
    return grids


class TokenPackerPreTrainedModel(PreTrainedModel):
    config_class = TokenPackerConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TokenPackerProjector"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_cache_class = True
    _supports_static_cache = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a bitsandbytes `quantization_config` without a skip list keeps the
        vision tower, the projector and `lm_head` unquantized (pass your own `llm_int8_skip_modules` to change it,
        e.g. without the two vision_tower names to quantize the vision tower too)."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = _with_default_quantization_skips(kwargs["quantization_config"])
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        """Modules of the vision tower get the tower's own initialisation (we keep only its inner transformer, which
        is no PreTrainedModel, so transformers would not dispatch to it): it restores the non-persistent
        `position_ids` buffer, which 5.0 and 5.1 leave uninitialised after loading. Everything else as transformers'
        default."""
        base = self if isinstance(self, TokenPackerModel) else getattr(self, "model", None)
        tower = getattr(base, "_vision_tower_model", None)
        if tower is not None and any(module is part for part in base.vision_tower.modules()):
            tower._init_weights(module)
        else:
            super()._init_weights(module)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config with the remote-code files and an `auto_map` naming every Auto class."""
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoModelForImageTextToText")
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _collect_device_map_rules(self, towers):
        """`_no_split_modules` of the sub-models (e.g. CLIPEncoderLayer, LlamaDecoderLayer) plus the projector, so
        device_map keeps every transformer block and the projector whole, and their `_skip_keys_device_placement`
        (the cache argument, whatever the release calls it), which accelerate's hooks must not move. 4.46 needs both
        up front; 5.x also collects them from the children in `post_init`."""
        names = ["TokenPackerProjector"]
        skip_keys = []
        for tower in towers:
            for name in getattr(tower, "_no_split_modules", None) or []:
                if name not in names:
                    names.append(name)
            keys = getattr(tower, "_skip_keys_device_placement", None) or []
            for key in [keys] if isinstance(keys, str) else keys:
                if key not in skip_keys:
                    skip_keys.append(key)
        self._no_split_modules = names
        self._skip_keys_device_placement = skip_keys


class TokenPackerModel(TokenPackerPreTrainedModel):
    """Vision tower + projector + language model without LM head (LLaVA's composition)."""

    # `AutoModel` on a checkpoint of the model with the head: the head's weight is expected to be left out.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        vision_tower = AutoModel.from_config(config.vision_config)
        language_model = AutoModel.from_config(config.text_config)
        self._collect_device_map_rules([vision_tower, language_model])
        # The full tower model is kept, unregistered, to be called (its forward records the hidden states in every
        # release; 5.0/5.1's inner transformer alone returns none) and to initialise its modules; its weights are
        # registered once, through the inner transformer.
        object.__setattr__(self, "_vision_tower_model", vision_tower)
        self.vision_tower = _inner_vision_model(vision_tower)
        self.multi_modal_projector = build_projector(config)
        self.language_model = language_model
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values):
        """`[num_blocks, 3, S, S]` pixel values -> `[num_blocks, image_seq_length, H]` packed visual tokens."""
        config = self.config
        # Device placement is the caller's (or accelerate's hooks' under a device_map); the dtype is the tower's.
        outputs = self._vision_tower_model(pixel_values.to(_floating_dtype(self.vision_tower)), output_hidden_states=True)
        hidden_states = outputs.hidden_states
        start = 1 if config.vision_feature_select_strategy == "default" else 0
        image_features = hidden_states[config.vision_feature_layer][:, start:]
        if config.projector_type == "mlp2x_gelu":
            return self.multi_modal_projector(image_features)
        region_features = torch.cat([hidden_states[layer][:, start:] for layer in config.region_feature_layers], -1)
        return self.multi_modal_projector(image_features, region_features)

    def image_token_mask(self, input_ids, inputs_embeds):
        """`[batch, seq_len]` bool mask of the image-token positions (from ids, or by matching the image token's
        embedding when only `inputs_embeds` are given)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, dtype=torch.long, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding).all(-1)

    def scatter_image_features(self, inputs_embeds, image_mask, image_features):
        """Write `[num_blocks, T, H]` features, in order, into the `image_mask` positions of `[batch, seq, H]`."""
        num_tokens = int(image_mask.sum())
        num_features = image_features.shape[0] * image_features.shape[1]
        if num_tokens != num_features:
            raise ValueError(
                f"Image features and image tokens do not match: the input has {num_tokens} image tokens "
                f"(id {self.config.image_token_id}) but the pixel values give {num_features} features "
                f"({image_features.shape[0]} blocks x {image_features.shape[1]} tokens). Build inputs with "
                "TokenPackerProcessor, which expands each <image> to the right number of tokens."
            )
        image_features = image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.device, inputs_embeds.dtype)
        mask = image_mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        return inputs_embeds.masked_scatter(mask, image_features)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        return_dict=None,
        image_grids=None,
        **kwargs,
    ):
        """input_ids `[batch, seq]` with `image_seq_length` image tokens per block; pixel_values
        `[num_blocks, 3, S, S]` in the order the blocks appear in the batch. image_grids (optional, from the image
        processor's 'slice' mode): `[num_images, 2]` (rows, cols) per image, checked against pixel_values (each
        image has rows*cols blocks plus a global view when rows*cols > 1); the processor lays the blocks out in
        `input_ids`, so the model only checks the count and scatters the features in order.

        Everything else (the KV cache, `use_cache`, `output_attentions`, `output_hidden_states`, attention-backend
        arguments) goes to the language model unchanged, under the names the installed release gives them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if image_grids is not None:
            check_image_grids(image_grids, pixel_values)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
            image_mask = self.image_token_mask(input_ids, inputs_embeds)
            inputs_embeds = self.scatter_image_features(inputs_embeds, image_mask, image_features)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        output = _build_output(TokenPackerModelOutputWithPast, outputs, image_hidden_states=image_features)
        return output if return_dict is not False else output.to_tuple()


class TokenPackerForConditionalGeneration(TokenPackerPreTrainedModel, GenerationMixin):
    """TokenPacker with a language-modeling head; generates text about images."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        self.model = TokenPackerModel(config)
        self._no_split_modules = self.model._no_split_modules
        self._skip_keys_device_placement = list(self.model._skip_keys_device_placement)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def multi_modal_projector(self):
        return self.model.multi_modal_projector

    @property
    def language_model(self):
        return self.model.language_model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def get_decoder(self):
        return self.model.language_model

    def get_image_features(self, pixel_values):
        """`[num_blocks, 3, S, S]` -> `[num_blocks, image_seq_length, H]` packed visual tokens."""
        return self.model.get_image_features(pixel_values)

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        return_dict=None,
        logits_to_keep=0,
        image_grids=None,
        **kwargs,
    ):
        """As `TokenPackerModel.forward` (including the optional `image_grids` of 'slice' mode, and the cache and
        other language-model arguments passed through `kwargs`); `labels` `[batch, seq]` (IGNORE_INDEX -100 where
        no loss) give a next-token loss in which image-token positions never count."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_grids=image_grids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            image_mask = self.model.image_token_mask(input_ids, inputs_embeds).to(labels.device)
            loss = self.next_token_loss(logits, labels.masked_fill(image_mask, IGNORE_INDEX), num_items_in_batch)

        output = _build_output(TokenPackerCausalLMOutputWithPast, outputs, loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def next_token_loss(logits, labels, num_items_in_batch=None):
        """Mean cross-entropy of position t predicting label t+1 (float32), skipping IGNORE_INDEX; with
        `num_items_in_batch` (Trainer's gradient accumulation) the sum divided by that count."""
        shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
        if num_items_in_batch is None:
            return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)
        loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return loss / num_items_in_batch

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_grids=None, **kwargs):
        """The language model's own preparation (the cache and every other argument passed through unchanged), plus
        the pixel values (and their image_grids) on the step that needs them."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if pixel_values is not None and _is_prefill_step(kwargs):
            model_inputs["pixel_values"] = pixel_values
            if image_grids is not None:
                model_inputs["image_grids"] = image_grids
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """GenerationMixin repeats every tensor along dim 0 for `num_beams`/`num_return_sequences`; pixel values
        hold blocks, not prompts, so they (and image_grids) are repeated per prompt instead: each prompt's blocks,
        found from its image tokens in `input_ids`, `expand_size` times in a row (same signature in 4.46 ... 5.x)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        image_grids = model_kwargs.pop("image_grids", None)
        if expand_size > 1 and pixel_values is not None:
            pixel_values, image_grids = self._repeat_blocks_per_prompt(input_ids, pixel_values, image_grids,
                                                                       expand_size)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        if image_grids is not None:
            model_kwargs["image_grids"] = image_grids
        return input_ids, model_kwargs

    def _repeat_blocks_per_prompt(self, input_ids, pixel_values, image_grids, expand_size):
        """(pixel_values, image_grids) with each prompt's blocks and grids repeated `expand_size` times in a row.
        Without input_ids, or when the image tokens do not match the blocks, every entry is repeated in place (one
        image per prompt; a real mismatch is then reported by the forward's checks)."""
        grids = None if image_grids is None else torch.as_tensor(image_grids)
        blocks = [1] * pixel_values.shape[0] if grids is None else blocks_per_image(grids).tolist()
        parts = []  # (first block, end block, first image, end image) per prompt
        block = image = 0
        tokens_per_prompt = [] if input_ids is None else (input_ids == self.config.image_token_id).sum(-1).tolist()
        for tokens in tokens_per_prompt:
            start_block, start_image = block, image
            while tokens > 0 and image < len(blocks):
                tokens -= blocks[image] * self.config.image_seq_length
                block, image = block + blocks[image], image + 1
            parts.append((start_block, block, start_image, image) if tokens == 0 else None)
        if input_ids is None or None in parts or block != pixel_values.shape[0]:
            repeat = lambda value: value.repeat_interleave(expand_size, dim=0)  # noqa: E731
            return repeat(pixel_values), None if grids is None else repeat(grids)
        pixel_values = torch.cat([pixel_values[a:b] for a, b, _, _ in parts for _ in range(expand_size)])
        if grids is not None:
            grids = torch.cat([grids[c:d] for _, _, c, d in parts for _ in range(expand_size)])
        return pixel_values, grids

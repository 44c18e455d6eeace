"""VLoRA: a vision tower, a perceptual weights generator and a causal language model whose own linear maps receive
per-image low-rank deltas (`modeling_vlora_deltas.py`). The prompt holds one placeholder position per image and no
visual tokens.

Shipped inside checkpoints as remote code: imports only torch, transformers and sibling modules, and works from
transformers 4.46 to 5.x without version checks (docs/private-surface.md lists what it relies on).
"""

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

# transformers 4.46 copies only the relative imports an entry module names itself into its module cache: every
# module this one needs, directly or not, is named here.
from .configuration_tokenpacker import DEFAULT_VISION_CONFIG  # noqa: F401
from .configuration_vlora import AUTO_MAP, GENERATION_POSITIONS, VLoRAConfig
from .modeling_common import (
    IGNORE_INDEX,
    attach_vision_tower,
    build_output,
    check_pixel_values,
    check_text_inputs,
    collect_device_map_rules,
    floating_dtype,
    init_vision_tower_module,
    is_prefill_step,
    lm_head_tp_plan,
    next_token_loss,
    register_with_auto_classes,
    slice_logits,
    with_default_quantization_skips,
)
from .modeling_vlora_deltas import clear_deltas, set_deltas
from .modeling_vlora_generator import VLoRAPerceptualWeightsGenerator

# Modules bitsandbytes leaves in the compute dtype unless the user's config names its own skip list (both name
# styles: 5.x matches from the root or as a suffix, 4.x by substring).
MODULES_NOT_TO_QUANTIZE = ["vision_tower", "model.vision_tower", "perceptual_weights_generator",
                           "model.perceptual_weights_generator", "lm_head"]
# Attribute of a KV cache that carries the perceptual weights of the sequences it holds to their decode steps.
CACHE_STATE = "vlora_state"


@dataclass
class VLoRAModelOutputWithPast(BaseModelOutputWithPast):
    """Output of `VLoRAModel`: the language model's fields, under the installed release's names (the KV cache is
    `past_key_values` up to 5.23 and `cache` from 5.24)."""


@dataclass
class VLoRACausalLMOutputWithPast(CausalLMOutputWithPast):
    """Output of `VLoRAForConditionalGeneration`: transformers' causal-LM fields (`loss` ignores the placeholder
    positions)."""


class VLoRAState:
    """The perceptual weights in force for a batch of `batch` sequences.

    Args:
        deltas: `{layer index: {letter: (A [batch, in, r], B [out, r])}}`; rows without an image have A = 0, so their
            deltas vanish exactly and they get the plain language model.
        placeholder_columns: int64 `[batch]`, the attention-mask column of each row's placeholder (-1: none).
    """

    def __init__(self, deltas, placeholder_columns):
        self.deltas = deltas
        self.placeholder_columns = placeholder_columns

    @property
    def batch_size(self):
        return self.placeholder_columns.shape[0]


def find_cache(values):
    """The KV cache among `values` (a kwargs dict or a model output), found by type: its name differs by release."""
    return next((value for value in values if isinstance(value, Cache)), None)


class VLoRAPreTrainedModel(PreTrainedModel):
    config_class = VLoRAConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VLoRAPerceptualWeightsGenerator"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # 4.x names of the same capabilities (see TokenPackerPreTrainedModel).
    _supports_flash_attn_2 = True
    _supports_cache_class = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        register_with_auto_classes(type(config), VLoRAModel, VLoRAForConditionalGeneration)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a bitsandbytes `quantization_config` without a skip list quantizes
        only the language model: the deltas are added in its compute dtype, as QLoRA's adapters are."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_default_quantization_skips(
                kwargs["quantization_config"], MODULES_NOT_TO_QUANTIZE
            )
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        """The vision tower's modules get the tower's own initialisation, everything else transformers' default (the
        generator's queries and position embeddings are drawn with std 1 and B is zero at construction)."""
        base = self if isinstance(self, VLoRAModel) else getattr(self, "model", None)
        if base is None or not init_vision_tower_module(base, module):
            super()._init_weights(module)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """As transformers' (5.24's `activation_checkpointing_enable` comes here too), always non-reentrant: the
        deltas enter the checkpointed layers through hooks, not as inputs, and reentrant checkpointing (4.x's
        default) would give the generator no gradient through them."""
        checkpoint_kwargs = dict(gradient_checkpointing_kwargs or {})
        if checkpoint_kwargs.get("use_reentrant"):
            raise ValueError("VLoRA needs non-reentrant gradient checkpointing (use_reentrant=False): with "
                             "use_reentrant=True the perceptual weights generator would get no gradient.")
        checkpoint_kwargs["use_reentrant"] = False
        with warnings.catch_warnings():
            # 5.24 calls this name deprecated; it is the entry point that every release routes through an override.
            warnings.filterwarnings("ignore", message=".*gradient_checkpointing_enable.*", category=FutureWarning)
            return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config with the remote-code files and an `auto_map` naming every Auto class."""
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoModelForImageTextToText")
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class VLoRAModel(VLoRAPreTrainedModel):
    """Vision tower + perceptual weights generator + language model without LM head."""

    def __init__(self, config: VLoRAConfig):
        super().__init__(config)
        vision_tower = AutoModel.from_config(config.vision_config)
        language_model = AutoModel.from_config(config.text_config)
        collect_device_map_rules(self, [vision_tower, language_model], ["VLoRAPerceptualWeightsGenerator"])
        attach_vision_tower(self, vision_tower)
        self.perceptual_weights_generator = VLoRAPerceptualWeightsGenerator(config)
        self.language_model = language_model
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values, vision_feature_layer=None, **kwargs):
        """pixel_values `[num_images, 3, S, S]` -> the tower's features the generator reads `[num_images, P, C]`
        (layer `vision_feature_layer`, the config's by default; CLS dropped with the "default" strategy)."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        outputs = self._vision_tower_model(pixel_values.to(floating_dtype(self.vision_tower)),
                                           output_hidden_states=True)
        start = 1 if self.config.vision_feature_select_strategy == "default" else 0
        return outputs.hidden_states[layer][:, start:]

    def get_perceptual_weights(self, pixel_values):
        """pixel_values `[num_images, 3, S, S]` -> `{letter: (A [num_images, S_slots, in, r], B [S_slots, out, r])}`,
        B already scaled by `alpha / r`; slot `j` is for layer `(j + 1) * layer_stride - 1`."""
        generator = self.perceptual_weights_generator
        features = self.get_image_features(pixel_values)
        return generator(features.to(floating_dtype(generator)))

    def build_state(self, perceptual_weights, placeholder, past_length):
        """A `VLoRAState` for a batch whose rows `placeholder.any(-1)` hold the images of `perceptual_weights` in
        order; the other rows get A = 0. placeholder `[batch, seq]` bool; `past_length` tokens precede them."""
        has_image = placeholder.any(-1)
        deltas = {}
        for slot, layer in enumerate(self.config.patched_layers):
            deltas[layer] = {}
            for letter, (factor_a, factor_b) in perceptual_weights.items():
                rows = factor_a[:, slot]
                if not bool(has_image.all()):
                    full = rows.new_zeros((placeholder.shape[0],) + tuple(rows.shape[1:]))
                    rows = full.index_copy(0, has_image.nonzero()[:, 0].to(rows.device), rows)
                deltas[layer][letter] = (rows, factor_b[slot])
        columns = torch.where(has_image, placeholder.to(torch.int64).argmax(-1) + past_length,
                              torch.full_like(has_image, -1, dtype=torch.int64))
        return VLoRAState(deltas, columns)

    def _state_for(self, input_ids, pixel_values, cache, image_repeats=1):
        """The state of this call: built from `pixel_values` (each image's weights used by `image_repeats` rows in a
        row), else the one the cache carries from its prefill, else None (plain language model); ValueError when
        images and placeholders disagree."""
        placeholder = None if input_ids is None else input_ids == self.config.image_token_id
        past_length = 0 if cache is None else cache.get_seq_length()
        carried = None if cache is None else getattr(cache, CACHE_STATE, None)
        if pixel_values is not None:
            if placeholder is None:
                raise ValueError("pixel_values need input_ids with an image placeholder (id "
                                 f"{self.config.image_token_id}) per image to say which rows they belong to.")
            per_row = placeholder.sum(-1)
            if bool((per_row > 1).any()):
                raise ValueError(f"VLoRA gives a sequence the weights of one image; the rows hold {per_row.tolist()} "
                                 "image placeholders. Write at most one <image> per prompt.")
            if int(per_row.sum()) != pixel_values.shape[0] * image_repeats:
                repeats = f" x {image_repeats} repeats" if image_repeats > 1 else ""
                raise ValueError(f"The inputs hold {int(per_row.sum())} image placeholders (id "
                                 f"{self.config.image_token_id}) but pixel_values has {pixel_values.shape[0]} images"
                                 f"{repeats}; give one image per placeholder.")
            if carried is not None:
                raise ValueError("The cache already holds a sequence with its image; VLoRA gives a sequence one "
                                 "image. Start a new cache for a new image.")
            check_pixel_values(pixel_values, self.config.vision_config.image_size)
            weights = self.get_perceptual_weights(pixel_values)
            if image_repeats > 1:
                weights = {letter: (a.repeat_interleave(image_repeats, 0), b) for letter, (a, b) in weights.items()}
            return self.build_state(weights, placeholder, past_length)
        if carried is not None:
            batch = input_ids.shape[0] if input_ids is not None else None
            if batch is not None and batch != carried.batch_size:
                raise ValueError(f"The cache carries the perceptual weights of {carried.batch_size} sequences but the "
                                 f"inputs have {batch} rows.")
            return carried
        if placeholder is not None and bool(placeholder.any()):
            raise ValueError(f"input_ids hold image placeholders (id {self.config.image_token_id}) but no "
                             "pixel_values were given; pass the images the processor prepared with the prompt.")
        return None

    @staticmethod
    def mask_placeholders(attention_mask, state, batch, total_length, device):
        """The attention mask with every placeholder column 0 (no query attends to a placeholder), or the mask as it
        is when no row has one. A missing mask becomes ones `[batch, total_length]` first; a non-2-D mask cannot be
        edited (ValueError)."""
        if state is None or not bool((state.placeholder_columns >= 0).any()):
            return attention_mask
        if attention_mask is None:
            attention_mask = torch.ones(batch, total_length, dtype=torch.long, device=device)
        elif not torch.is_tensor(attention_mask) or attention_mask.ndim != 2:
            raise ValueError("VLoRA masks the image placeholder in a 2-D attention_mask [batch, past + seq]; got "
                             f"{type(attention_mask).__name__} of shape {list(getattr(attention_mask, 'shape', []))} "
                             "(static caches and custom 4-D masks are not supported).")
        else:
            attention_mask = attention_mask.clone()
        columns = state.placeholder_columns.to(attention_mask.device)
        rows = ((columns >= 0) & (columns < attention_mask.shape[1])).nonzero()[:, 0]
        attention_mask[rows, columns[rows]] = 0
        return attention_mask

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                return_dict=None, image_repeats=1, **kwargs):
        """input_ids `[batch, seq]` with at most one placeholder (`image_token_id`) per row; pixel_values
        `[num_images, 3, S, S]`, one per placeholder, in row order (with `image_repeats` r, each image serves the next
        r rows with a placeholder: `generate` repeats prompts for beams and `num_return_sequences`, not images). The placeholder is embedded as
        `image_token_embedding_id`, keeps its position and is masked out of attention (the caller's tensors are not
        changed); rows with an image get the deltas of its perceptual weights, the others the plain language model.
        On decode steps the cache carries the weights of its prefill. `inputs_embeds` serve text-only batches and
        decode steps.

        Everything else (the KV cache, `use_cache`, `output_attentions`, `output_hidden_states`, attention-backend
        arguments) goes to the language model unchanged, under the names the installed release gives them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        placeholder = None if input_ids is None else input_ids == self.config.image_token_id
        text_ids = None if input_ids is None else input_ids.masked_fill(placeholder,
                                                                        self.config.image_token_embedding_id)
        check_text_inputs(text_ids, inputs_embeds, attention_mask, None, self.config.text_config.vocab_size)
        cache = find_cache(kwargs.values())
        state = self._state_for(input_ids, pixel_values, cache, int(image_repeats or 1))
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(text_ids)
        batch, length = inputs_embeds.shape[:2]
        past_length = 0 if cache is None else cache.get_seq_length()
        attention_mask = self.mask_placeholders(attention_mask, state, batch, past_length + length,
                                                inputs_embeds.device)
        set_deltas(self.language_model, self.config, None if state is None else state.deltas)
        try:
            outputs = self.language_model(attention_mask=attention_mask, position_ids=position_ids,
                                          inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        finally:
            # Gradient checkpointing recomputes the layers during backward: the deltas must still be in force then.
            if not (self.training and torch.is_grad_enabled() and any(
                    getattr(module, "gradient_checkpointing", False) for module in self.language_model.modules())):
                clear_deltas(self.language_model)
        returned_cache = find_cache(outputs.values())
        if returned_cache is not None and state is not None:
            setattr(returned_cache, CACHE_STATE, state)
        output = build_output(VLoRAModelOutputWithPast, outputs)
        return output if return_dict is not False else output.to_tuple()


class VLoRAForConditionalGeneration(VLoRAPreTrainedModel, GenerationMixin):
    """VLoRA with a language-modeling head; generates text about images."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: VLoRAConfig):
        super().__init__(config)
        self.model = VLoRAModel(config)
        self._no_split_modules = self.model._no_split_modules
        self._skip_keys_device_placement = list(self.model._skip_keys_device_placement)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        self._tp_plan = {**(getattr(self, "_tp_plan", None) or {}), **lm_head_tp_plan(config.text_config)}

    @property
    def vision_tower(self):
        return self.model.vision_tower

    @property
    def perceptual_weights_generator(self):
        return self.model.perceptual_weights_generator

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

    def get_image_features(self, pixel_values, **kwargs):
        """As `VLoRAModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    def get_perceptual_weights(self, pixel_values):
        """As `VLoRAModel.get_perceptual_weights`."""
        return self.model.get_perceptual_weights(pixel_values)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None, return_dict=None, logits_to_keep=0, **kwargs):
        """As `VLoRAModel.forward`. `labels` `[batch, seq]` (IGNORE_INDEX -100 where no loss) give a next-token
        loss in which the placeholder positions never count; `shift_labels` and `num_items_in_batch` as Trainer
        and sequence-parallel training pass them."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        image_token_id = self.config.image_token_id
        for name, value in (("labels", labels), ("shift_labels", shift_labels)):
            if value is not None and tuple(value.shape) != tuple((input_ids if input_ids is not None
                                                                  else inputs_embeds).shape[:2]):
                raise ValueError(f"{name} must have the inputs' shape; got {list(value.shape)}.")
        outputs = self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs)
        logits = self.lm_head(slice_logits(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if shift_labels is not None:
            shift_labels = shift_labels.masked_fill(shift_labels == image_token_id, IGNORE_INDEX)
            loss = next_token_loss(logits, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            labels = labels.masked_fill(labels == image_token_id, IGNORE_INDEX)
            if input_ids is not None:
                labels = labels.masked_fill((input_ids == image_token_id).to(labels.device), IGNORE_INDEX)
            loss = next_token_loss(logits, labels=labels, num_items_in_batch=num_items_in_batch)
        output = build_output(VLoRACausalLMOutputWithPast, outputs, loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, generation_positions=None, image_repeats=None,
                                      **kwargs):
        """The language model's own preparation (the cache and every other argument passed through unchanged), plus
        the pixel values (and `image_repeats`, see `_expand_inputs_for_generation`) on the prefill step. With `generation_positions="original"` (per call, or the config's),
        every decoded token of a row with an image gets the position one less than a full forward gives it, as the
        original `generate` numbers them."""
        rule = generation_positions or self.config.generation_positions
        if rule not in GENERATION_POSITIONS:
            raise ValueError(f"generation_positions must be one of {GENERATION_POSITIONS}; got {rule!r}.")
        prefill = is_prefill_step(kwargs)
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if pixel_values is not None and prefill:
            model_inputs["pixel_values"] = pixel_values
            if image_repeats is not None:
                model_inputs["image_repeats"] = image_repeats
        positions = model_inputs.get("position_ids")
        if rule == "original" and not prefill and positions is not None:
            has_image = (input_ids == self.config.image_token_id).any(-1, keepdim=True)
            model_inputs["position_ids"] = positions - has_image.to(positions.device, positions.dtype)
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """GenerationMixin repeats every tensor `expand_size` times for `num_beams` / `num_return_sequences`; the
        images are kept once each and `image_repeats` tells the forward to share each image's perceptual weights
        among its repeated rows, so the generator runs once per image (same signature in 4.46 ... 5.x)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
            if expand_size > 1:
                model_kwargs["image_repeats"] = expand_size
        return input_ids, model_kwargs

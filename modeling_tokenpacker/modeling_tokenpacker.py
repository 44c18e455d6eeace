"""TokenPacker: a vision tower, a region-to-point projector and a causal language model.

Shipped inside checkpoints as remote code: imports only torch, transformers and sibling modules, and works from
transformers 4.46 to 5.x without version checks (docs/private-surface.md lists what it relies on).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from .configuration_tokenpacker import AUTO_MAP, TokenPackerConfig
from .modeling_common import (
    IGNORE_INDEX,
    attach_vision_tower,
    build_output,
    check_pixel_values,
    check_text_inputs,
    collect_device_map_rules,
    floating_dtype,
    has_past,
    init_vision_tower_module,
    is_compiling,
    is_prefill_step,
    lm_head_tp_plan,
    next_token_loss,
    register_with_auto_classes,
    slice_logits,
    with_default_quantization_skips,
)
from .modeling_tokenpacker_projector import build_projector

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
            into the image-token positions (None when no image was given).
        image_outputs: what `get_image_features(..., return_dict=True)` returned for the images (as transformers
            5.24's multimodal outputs carry it): `pooler_output` one `[tokens, hidden]` tensor per image.
    """

    image_hidden_states: Optional[torch.FloatTensor] = None
    image_outputs: Optional[BaseModelOutputWithPooling] = None


@dataclass
class TokenPackerCausalLMOutputWithPast(CausalLMOutputWithPast):
    """Output of `TokenPackerForConditionalGeneration`: transformers' causal-LM fields (`loss` ignores image
    positions; `logits` `[batch, seq_len, vocab]` or the last `logits_to_keep` positions), plus

    Args:
        image_hidden_states, image_outputs: as in `TokenPackerModelOutputWithPast`.
    """

    image_hidden_states: Optional[torch.FloatTensor] = None
    image_outputs: Optional[BaseModelOutputWithPooling] = None


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
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["TokenPackerProjector"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The 4.x names of the same capabilities (5.x reads none of them): without `_supports_cache_class` 4.46 falls back
    # to tuple caches, without `_supports_static_cache` it refuses `cache_implementation="static"`.
    _supports_flash_attn_2 = True
    _supports_cache_class = True
    _supports_static_cache = True

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        register_with_auto_classes(type(config), TokenPackerModel, TokenPackerForConditionalGeneration)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`; a bitsandbytes `quantization_config` without a skip list keeps the
        vision tower, the projector and `lm_head` unquantized (pass your own `llm_int8_skip_modules` to change it,
        e.g. without the two vision_tower names to quantize the vision tower too)."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_default_quantization_skips(
                kwargs["quantization_config"], MODULES_NOT_TO_QUANTIZE
            )
        return super().from_pretrained(*args, **kwargs)

    def _init_weights(self, module):
        """The vision tower's modules get the tower's own initialisation (`init_vision_tower_module`), everything
        else transformers' default."""
        base = self if isinstance(self, TokenPackerModel) else getattr(self, "model", None)
        if base is None or not init_vision_tower_module(base, module):
            super()._init_weights(module)

    def push_to_hub(self, repo_id, *args, **kwargs):
        """As transformers' `push_to_hub`; a repository that has no model card yet first gets this model's
        (`modeling_tokenpacker_card.build_model_card`: license, base model, pipeline tag, paper, usage), which
        transformers then keeps and tags instead of writing its generic one."""
        from huggingface_hub import HfApi

        from .modeling_tokenpacker_card import build_model_card

        api = HfApi(token=kwargs.get("token"))
        repo = api.create_repo(repo_id, private=kwargs.get("private"), exist_ok=True).repo_id
        if not api.file_exists(repo, "README.md"):
            card = build_model_card(self.config, repo_id=repo)
            api.upload_file(path_or_fileobj=str(card).encode("utf-8"), path_in_repo="README.md", repo_id=repo,
                            commit_message="Add the model card")
        return super().push_to_hub(repo_id, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config with the remote-code files and an `auto_map` naming every Auto class."""
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoModelForImageTextToText")
        if type(self.config)._auto_class is None:
            type(self.config).register_for_auto_class("AutoConfig")
        self.config.auto_map = dict(AUTO_MAP)
        return super().save_pretrained(save_directory, *args, **kwargs)


class TokenPackerModel(TokenPackerPreTrainedModel):
    """Vision tower + projector + language model without LM head (LLaVA's composition)."""

    def __init__(self, config: TokenPackerConfig):
        super().__init__(config)
        vision_tower = AutoModel.from_config(config.vision_config)
        language_model = AutoModel.from_config(config.text_config)
        collect_device_map_rules(self, [vision_tower, language_model], ["TokenPackerProjector"])
        attach_vision_tower(self, vision_tower)
        self.multi_modal_projector = build_projector(config)
        self.language_model = language_model
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def pack_images(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                    output_attentions=None):
        """`[num_blocks, 3, S, S]` pixel values -> (the vision tower's output with every hidden state,
        `[num_blocks, image_seq_length, H]` packed visual tokens). `vision_feature_layer` and
        `vision_feature_select_strategy` default to the config's (the point queries' layer and whether the CLS token
        is dropped)."""
        config = self.config
        layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or config.vision_feature_select_strategy
        if strategy not in ("default", "full") or (strategy == "full" and config.projector_type != "mlp2x_gelu"):
            raise ValueError(
                f"vision_feature_select_strategy must be 'default' or, for mlp2x_gelu only, 'full'; got {strategy!r} "
                f"for projector_type {config.projector_type!r}."
            )
        # Device placement is the caller's (or accelerate's hooks' under a device_map); the dtype is the tower's.
        tower_kwargs = {"output_hidden_states": True}
        if output_attentions:
            tower_kwargs["output_attentions"] = True
        outputs = self._vision_tower_model(pixel_values.to(floating_dtype(self.vision_tower)), **tower_kwargs)
        hidden_states = outputs.hidden_states
        start = 1 if strategy == "default" else 0
        image_features = hidden_states[layer][:, start:]
        if config.projector_type != "tokenpacker":  # mlp2x_gelu, avg_pool, resampler: one layer's features
            return outputs, self.multi_modal_projector(image_features)
        region_features = torch.cat([hidden_states[index][:, start:] for index in config.region_feature_layers], -1)
        return outputs, self.multi_modal_projector(image_features, region_features)

    def get_image_features(self, pixel_values, image_grids=None, vision_feature_layer=None,
                           vision_feature_select_strategy=None, output_hidden_states=None, output_attentions=None,
                           return_dict=None, **kwargs):
        """The packed visual tokens, as transformers' vision-language models return image features.

        pixel_values `[num_blocks, 3, S, S]`; image_grids (optional, 'slice' mode) `[num_images, 2]` say which
        blocks form each image. Returns a `BaseModelOutputWithPooling` (a tuple of its fields with
        `return_dict=False`; the default is the config's `return_dict`, True unless changed):
        - `pooler_output`: one `[tokens, H]` tensor per image (an HD image's blocks in order, each
          `image_seq_length` tokens; without image_grids every block is an image);
        - `last_hidden_state`: the vision tower's last layer `[num_blocks, 1 + g*g, C]`;
        - `hidden_states` / `attentions`: the tower's, when `output_hidden_states` / `output_attentions` is set.
        Other keyword arguments (e.g. the bookkeeping fields vLLM forwards) are ignored. `pack_images` gives the plain
        `[num_blocks, image_seq_length, H]` tensor.
        """
        if image_grids is not None:
            image_grids = check_image_grids(image_grids, pixel_values)
        tower_outputs, packed = self.pack_images(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                                 output_attentions)
        tokens = packed.reshape(-1, packed.shape[-1])
        blocks = [1] * packed.shape[0] if image_grids is None else blocks_per_image(image_grids).tolist()
        per_image = tuple(torch.split(tokens, [count * packed.shape[1] for count in blocks]))
        output = BaseModelOutputWithPooling(
            last_hidden_state=tower_outputs.last_hidden_state,
            pooler_output=per_image,
            hidden_states=tower_outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(tower_outputs, "attentions", None) if output_attentions else None,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()

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
        """Write `[num_tokens, H]` features, in order, into the `image_mask` positions of `[batch, seq, H]`. The
        count check reads a tensor value, so it is left out while torch.compile traces."""
        num_tokens = None if is_compiling() else int(image_mask.sum())
        if num_tokens is not None and num_tokens != image_features.shape[0]:
            raise ValueError(
                f"Image features and image tokens do not match: the input has {num_tokens} image tokens "
                f"(id {self.config.image_token_id}) but the images give {image_features.shape[0]} features "
                f"({self.config.image_seq_length} per block). Build inputs with TokenPackerProcessor, which expands "
                "each <image> to the right number of tokens."
            )
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
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
        mm_encoder_outputs=None,
        **kwargs,
    ):
        """input_ids `[batch, seq]` with `image_seq_length` image tokens per block; pixel_values
        `[num_blocks, 3, S, S]` in the order the blocks appear in the batch. image_grids (optional, from the image
        processor's 'slice' mode): `[num_images, 2]` (rows, cols) per image, checked against pixel_values (each
        image has rows*cols blocks plus a global view when rows*cols > 1); the processor lays the blocks out in
        `input_ids`, so the model only checks the count and scatters the features in order. Instead of pixel
        values, `mm_encoder_outputs={"image": get_image_features(..., return_dict=True)}` gives images already
        encoded (transformers 5.24's generation passes them so).

        Everything else (the KV cache, `use_cache`, `output_attentions`, `output_hidden_states`, attention-backend
        arguments) goes to the language model unchanged, under the names the installed release gives them."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        check_text_inputs(input_ids, inputs_embeds, attention_mask, kwargs.get("labels"),
                          self.config.text_config.vocab_size)
        image_outputs = (mm_encoder_outputs or {}).get("image")
        if pixel_values is not None and image_outputs is not None:
            raise ValueError("Pass the images either as pixel_values or as mm_encoder_outputs, not both.")
        if image_grids is not None and image_outputs is None:
            check_image_grids(image_grids, pixel_values)
        if pixel_values is not None:
            check_pixel_values(pixel_values, self.config.vision_config.image_size)
        elif image_outputs is None and input_ids is not None and not is_compiling() and not has_past(kwargs) \
                and bool((input_ids == self.config.image_token_id).any()):
            raise ValueError(f"input_ids hold image tokens (id {self.config.image_token_id}) but no pixel_values were "
                             "given; pass the images the processor prepared with the prompt.")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_hidden_states = None
        if pixel_values is not None:
            image_outputs = self.get_image_features(pixel_values, image_grids=image_grids, return_dict=True)
        if image_outputs is not None:
            image_tokens = torch.cat(list(image_outputs.pooler_output))
            image_mask = self.image_token_mask(input_ids, inputs_embeds)
            inputs_embeds = self.scatter_image_features(inputs_embeds, image_mask, image_tokens)
            if image_tokens.shape[0] % self.config.image_seq_length == 0:
                image_hidden_states = image_tokens.reshape(-1, self.config.image_seq_length, image_tokens.shape[-1])

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **kwargs,
        )
        output = build_output(TokenPackerModelOutputWithPast, outputs, image_hidden_states=image_hidden_states,
                              image_outputs=image_outputs)
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
        # After post_init, which gathers the sub-models' plans: the language model's own causal-LM class says how its
        # head is sharded, in the installed release's words.
        self._tp_plan = {**(getattr(self, "_tp_plan", None) or {}), **lm_head_tp_plan(config.text_config)}

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

    def get_image_features(self, pixel_values, **kwargs):
        """As `TokenPackerModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

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
        """As `TokenPackerModel.forward` (including the optional `image_grids` of 'slice' mode, `mm_encoder_outputs`,
        and the cache and other language-model arguments passed through `kwargs`). `labels` `[batch, seq]`
        (IGNORE_INDEX -100 where no loss) give a next-token loss in which image-token positions never count;
        `shift_labels` `[batch, seq]` (each position's target, as sequence/context-parallel training passes them)
        are used as they are instead, with image-token targets ignored; `num_items_in_batch` as Trainer passes it."""
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is not None or shift_labels is not None:
            check_text_inputs(input_ids, inputs_embeds, None, labels if labels is not None else shift_labels,
                              self.config.text_config.vocab_size)
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
        logits = self.lm_head(slice_logits(outputs.last_hidden_state, logits_to_keep))

        loss = None
        image_token_id = self.config.image_token_id
        if shift_labels is not None:
            shift_labels = shift_labels.masked_fill(shift_labels == image_token_id, IGNORE_INDEX)
            loss = next_token_loss(logits, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
        elif labels is not None:
            image_mask = self.model.image_token_mask(input_ids, inputs_embeds).to(labels.device)
            labels = labels.masked_fill(image_mask | (labels == image_token_id), IGNORE_INDEX)
            loss = next_token_loss(logits, labels=labels, num_items_in_batch=num_items_in_batch)

        output = build_output(TokenPackerCausalLMOutputWithPast, outputs, loss=loss, logits=logits)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(self, input_ids, pixel_values=None, image_grids=None, **kwargs):
        """The language model's own preparation (the cache and every other argument passed through unchanged), plus
        the pixel values (and their image_grids) on the step that needs them."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if pixel_values is not None and is_prefill_step(kwargs):
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

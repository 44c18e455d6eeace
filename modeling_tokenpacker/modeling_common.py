"""What every vision-language model of this package shares: the vision tower's composition, outputs built from the
language model's own, the prefill rule of generation, the next-token loss, device-map and quantization defaults.

Shipped inside checkpoints as remote code with the model files: imports only torch and transformers, and works from
transformers 4.46 to 5.x without version checks (docs/private-surface.md lists what it relies on).
"""

import copy

import torch
import torch.nn.functional as F
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
from transformers.cache_utils import Cache

IGNORE_INDEX = -100


def build_output(output_class, source, **values):
    """`output_class` from the fields of `source` (another ModelOutput) that it declares, plus `values`. Copying by
    the installed release's own field names keeps the cache field's name (`past_key_values` up to transformers 5.23,
    `cache` from 5.24) out of this code."""
    names = output_class.__dataclass_fields__  # a dict of the fields (dataclasses.fields() breaks torch.compile graphs)
    return output_class(**{key: value for key, value in source.items() if key in names}, **values)


def is_compiling():
    """Whether torch.compile is tracing this call (checks that read tensor values are skipped then)."""
    check = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(check is not None and check())


def is_prefill_step(generation_kwargs):
    """Whether this generation step must see the image inputs: the first step of a new input, or every step
    without a cache. `generation_kwargs` are those `generate` hands to `prepare_inputs_for_generation`.

    5.x says `is_first_iteration=True` on the prefill step (5.24 passes nothing on decode steps); every release
    passes the KV cache, under its own name, which is found by type here: an empty cache, or none yet, also means
    the first step.
    """
    if generation_kwargs.get("use_cache") is False or generation_kwargs.get("is_first_iteration"):
        return True
    cache = next((value for value in generation_kwargs.values() if isinstance(value, Cache)), None)
    return cache is None or cache.get_seq_length() == 0


def next_token_loss(logits, labels=None, shift_labels=None, num_items_in_batch=None):
    """Cross-entropy of `logits` `[batch, seq, vocab]` (in float32) against the next tokens, skipping IGNORE_INDEX:
    `shift_labels` `[batch, seq]` (target of each position, as sequence/context-parallel training passes them) or
    else `labels` `[batch, seq]` shifted by one. Mean over the counted tokens, or their sum divided by
    `num_items_in_batch` (Trainer's gradient accumulation).

    The arithmetic of transformers 5.x's `ForCausalLMLoss`, written here because the 4.x one cannot take
    `shift_labels`."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    logits = logits.float().reshape(-1, logits.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, shift_labels, ignore_index=IGNORE_INDEX)
    loss = F.cross_entropy(logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def slice_logits(hidden_states, logits_to_keep):
    """`[batch, seq, H]` -> the positions `logits_to_keep` names: the last N for an int N > 0 (0 keeps all), or
    the given indices for a tensor."""
    if isinstance(logits_to_keep, int):
        return hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
    return hidden_states[:, logits_to_keep]


def with_default_quantization_skips(quantization_config, modules):
    """A copy of a bitsandbytes config (object or dict) whose unset `llm_int8_skip_modules` becomes `modules`, so
    only the language model's linear layers are quantized by default."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        if quantization_config.get("quant_method", "bitsandbytes") != "bitsandbytes":
            return quantization_config
        if quantization_config.get("llm_int8_skip_modules") is None:
            return {**quantization_config, "llm_int8_skip_modules": list(modules)}
        return quantization_config
    if getattr(quantization_config, "llm_int8_skip_modules", False) is None:
        quantization_config = copy.deepcopy(quantization_config)
        quantization_config.llm_int8_skip_modules = list(modules)
    return quantization_config


def floating_dtype(module):
    """dtype of the first floating-point parameter (a quantized module also holds integer weights)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.get_default_dtype()


def attach_vision_tower(model, tower):
    """Register `tower`'s inner transformer as `model.vision_tower` and keep the full tower model, unregistered, as
    `model._vision_tower_model`.

    `CLIPVisionModel` wraps a `vision_model` up to transformers 5.5 and has none from 5.6; registering the inner
    transformer gives the same weight names (`model.vision_tower.encoder...`) in every release. The full model is
    what gets called (its forward records the hidden states in every release; 5.0/5.1's inner transformer alone
    returns none) and what initialises the tower's modules (`init_vision_tower_module`)."""
    object.__setattr__(model, "_vision_tower_model", tower)
    model.vision_tower = getattr(tower, "vision_model", tower)


def init_vision_tower_module(model, module):
    """Initialise `module` with the vision tower's own `_init_weights` if it belongs to `model.vision_tower`; True
    if it did. The inner transformer is no PreTrainedModel, so transformers would not dispatch to the tower's init,
    which restores its non-persistent `position_ids` buffer (5.0 and 5.1 leave it uninitialised after loading)."""
    tower = getattr(model, "_vision_tower_model", None)
    if tower is None or not any(module is part for part in model.vision_tower.modules()):
        return False
    tower._init_weights(module)
    return True


def collect_device_map_rules(model, sub_models, own_blocks):
    """Give `model` the `_no_split_modules` of `sub_models` (e.g. CLIPEncoderLayer, LlamaDecoderLayer) plus
    `own_blocks`, so device_map keeps every transformer block and our own blocks whole, and their
    `_skip_keys_device_placement` (the cache argument, whatever the release calls it), which accelerate's hooks must
    not move. 4.46 needs both up front; 5.x also collects them from the children in `post_init`."""
    names = list(own_blocks)
    skip_keys = []
    for sub_model in sub_models:
        for name in getattr(sub_model, "_no_split_modules", None) or []:
            if name not in names:
                names.append(name)
        keys = getattr(sub_model, "_skip_keys_device_placement", None) or []
        for key in [keys] if isinstance(keys, str) else keys:
            if key not in skip_keys:
                skip_keys.append(key)
    model._no_split_modules = names
    model._skip_keys_device_placement = skip_keys


def lm_head_tp_plan(text_config):
    """The tensor-parallel plan the language model's own causal-LM class gives its `lm_head` in the installed
    release (`colwise_rep` in 4.x, `colwise_gather_output` in 5.x), or an empty plan for a language model without
    one."""
    try:
        causal_lm_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)]
    except (KeyError, ValueError):
        return {}
    style = (getattr(causal_lm_class, "_tp_plan", None) or {}).get("lm_head")
    return {"lm_head": style} if style else {}


def register_with_auto_classes(config_class, base_model_class, head_class):
    """Enter these classes in transformers' Auto tables, as `import modeling_tokenpacker` does for the package's own,
    so that generic code looking a class up by config (the base model for the head, the head for an
    `image-text-to-text` pipeline) finds them after a `trust_remote_code=True` load, which on its own enters only
    the one Auto class it was called through. `config_class` is the class of the model's config object: from 5.x on,
    the config of a remote-code load comes from another cached copy of the configuration module than the one the
    model module imports. Keys are config class objects, so one checkpoint's classes never displace another's; the
    model type goes to AutoConfig only if nothing holds it yet."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        for auto_class, model_class in ((AutoModel, base_model_class), (AutoModelForCausalLM, head_class),
                                        (AutoModelForImageTextToText, head_class)):
            auto_class.register(config_class, model_class, exist_ok=True)
        if config_class.model_type not in CONFIG_MAPPING:
            AutoConfig.register(config_class.model_type, config_class)
    except ValueError:
        # A release that compares the two classes' module paths (4.x) and sees copies: leave its tables as they are.
        pass


def check_pixel_values(pixel_values, image_size):
    """TypeError/ValueError unless `pixel_values` is a float tensor `[N >= 1, 3, image_size, image_size]` of
    finite values, as the image processors return with `return_tensors="pt"`."""
    expected = f"a float torch.Tensor [num_blocks, 3, {image_size}, {image_size}] as the image processor returns it"
    if not torch.is_tensor(pixel_values):
        raise TypeError(f"pixel_values must be {expected} (return_tensors='pt'); got {type(pixel_values).__name__}.")
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be {expected}; got dtype {pixel_values.dtype}.")
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"pixel_values must be {expected}; got shape {list(pixel_values.shape)}.")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image (shape [0, ...]); leave it out for a text-only batch.")
    if not is_compiling() and not bool(torch.isfinite(pixel_values).all()):
        raise ValueError("pixel_values holds NaN or infinite values; expected normalised pixels (the image "
                         "processor's output).")


def check_text_inputs(input_ids, inputs_embeds, attention_mask, labels, vocab_size):
    """TypeError/ValueError for ids, embeddings, masks or labels that cannot describe one batch: ids must be
    integer `[batch, seq]` within the vocabulary; the mask 2-D at least as long as the ids (past tokens count);
    labels of the ids' shape."""
    if input_ids is not None:
        if not torch.is_tensor(input_ids) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
            kind = input_ids.dtype if torch.is_tensor(input_ids) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer torch.Tensor [batch, seq]; got {kind}.")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq]; got shape {list(input_ids.shape)} (add a batch "
                             "dimension with input_ids[None]).")
        if not is_compiling() and input_ids.numel():
            low, high = int(input_ids.min()), int(input_ids.max())
            if low < 0 or high >= vocab_size:
                raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the vocabulary); got values in "
                                 f"[{low}, {high}].")
    elif inputs_embeds is not None and inputs_embeds.ndim != 3:
        raise ValueError(f"inputs_embeds must be [batch, seq, hidden]; got shape {list(inputs_embeds.shape)}.")
    batch_and_length = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
    if torch.is_tensor(attention_mask) and attention_mask.ndim == 2 and (
            attention_mask.shape[0] != batch_and_length[0] or attention_mask.shape[1] < batch_and_length[1]):
        raise ValueError(f"attention_mask {list(attention_mask.shape)} does not cover the inputs "
                         f"{list(batch_and_length)}: expected [batch, past + seq].")
    if labels is not None and tuple(labels.shape) != batch_and_length:
        raise ValueError(f"labels must have the inputs' shape {list(batch_and_length)}; got {list(labels.shape)}.")


def has_past(model_kwargs):
    """Whether the call continues a sequence: a cache (found by type, whatever its name) that holds tokens."""
    cache = next((value for value in model_kwargs.values() if isinstance(value, Cache)), None)
    return cache is not None and cache.get_seq_length() > 0

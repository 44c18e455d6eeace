"""Applying VLoRA's perceptual weights to a language model's own modules, without editing or forking its code.

A forward hook on each patched module (e.g. `layers.3.self_attn.q_proj`, `layers.3.mlp`) adds `x A Bᵀ`, where `x` is
the module's input, to its output. The factors in force are an attribute of the hooked module (`vlora_delta`), set by
`set_deltas` before every language-model call: hooks hold no reference to the owner, so copies of a model, modules
that transformers replaces when it quantizes (bitsandbytes), or that PEFT wraps, stay consistent (`set_deltas` finds
the targets by path each time and hooks any module that is new).

Shipped inside checkpoints as remote code with modeling_vlora.py (imports only torch).
"""

import torch

HOOKED = "_vlora_hooked"
DELTA = "vlora_delta"


def add_delta(module, args, kwargs, output):
    """Forward hook: `output + (x A) Bᵀ` with `x` the module's input `[b, L, in]`, `(A [b, in, r], B [out, r])` the
    module's `vlora_delta` (nothing when None), computed in `x`'s dtype and device (a quantized module's compute
    dtype). A module returning a tuple gets the delta on its first element."""
    delta = getattr(module, DELTA, None)
    if delta is None:
        return None
    x = args[0] if args else next(value for value in kwargs.values() if torch.is_tensor(value))
    factor_a, factor_b = delta
    update = torch.matmul(torch.matmul(x, factor_a.to(x)), factor_b.to(x).transpose(-1, -2))
    if isinstance(output, tuple):
        return (output[0] + update.to(output[0].dtype),) + tuple(output[1:])
    return output + update.to(output.dtype)


def decoder_layers(language_model):
    """The decoder layers of a transformers base model (`layers` of LLaMA, Mistral, Qwen2, ...)."""
    layers = getattr(language_model, "layers", None)
    if layers is None:
        raise ValueError(f"VLoRA patches the decoder layers of the language model, found as its `layers` list; "
                         f"{type(language_model).__name__} has none.")
    return layers


def target_modules(language_model, config):
    """`[(layer index, letter, module)]` of every patched map: layers `(i + 1) % layer_stride == 0`, the letters of
    `delta_targets`, each module found by its `delta_modules` path inside the layer (ValueError when absent)."""
    layers = decoder_layers(language_model)
    targets = []
    for index in config.patched_layers:
        for letter in config.delta_targets:
            path = config.delta_modules[letter]
            try:
                module = layers[index].get_submodule(path)
            except AttributeError:
                raise ValueError(f"Target {letter!r} of VLoRA is the module {path!r} of each decoder layer, which "
                                 f"{type(layers[index]).__name__} does not have; set delta_modules in the config."
                                 ) from None
            targets.append((index, letter, module))
    return targets


def set_deltas(language_model, config, deltas):
    """Put `deltas` in force: `{layer index: {letter: (A [b, in, r], B [out, r])}}`, or None for the plain language
    model. Every hooked module not named by `deltas` (an earlier target that PEFT has since wrapped, for instance)
    gets None."""
    for module in language_model.modules():
        if getattr(module, HOOKED, False):
            setattr(module, DELTA, None)
    if deltas is None:
        return
    for index, letter, module in target_modules(language_model, config):
        if not getattr(module, HOOKED, False):
            module.register_forward_hook(add_delta, with_kwargs=True)
            setattr(module, HOOKED, True)
        setattr(module, DELTA, deltas[index][letter])


def clear_deltas(language_model):
    """The plain language model again (hooks stay registered and add nothing)."""
    set_deltas(language_model, None, None)

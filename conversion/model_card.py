"""The model card (README.md) written into a converted folder: the checkpoint's own card plus the conversion's
provenance. TokenPacker's card is `modeling_tokenpacker_card.build_model_card` (the one `push_to_hub` writes);
VLoRA's is built here with the same metadata conventions. No local folder name is written."""

import datetime
import os

import torch

from . import CONVERTER_VERSION
from .common import looks_like_hub_id, sha256_file

VLORA_PAPER = "https://arxiv.org/abs/2405.20339"
VLORA_REPOSITORY = "https://github.com/FeipengMa6/VLoRA"
VLORA_TAGS = ["vlora", "llava", "multimodal", "image-text-to-text", "custom_code"]
LETTER_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "m": "a parallel branch around the MLP"}


def _common(converter, result):
    """(base_model, verified, ignored, tower) sentences both families' cards use."""
    preset = converter.preset or {}
    if converter.input and not os.path.exists(converter.input) and looks_like_hub_id(converter.input):
        base_model = converter.input
    else:
        base_model = preset.get("base_llm")
    verified = ("not run (--no-verify)" if result.verified_tensors is None else
                f"{result.verified_tensors} tensors equal bit for bit after loading with "
                "`AutoModelForImageTextToText(trust_remote_code=True)` in a fresh process")
    ignored = ", ".join(f"{count} x {reason}" for reason, count in sorted(result.ignored.items())) or "none"
    tower = "the copy embedded in the checkpoint" if converter.use_embedded_tower else "a CLIP checkpoint (--vision-tower)"
    return base_model, verified, ignored, tower


def _versions():
    import modeling_tokenpacker
    import transformers

    return (f"modeling_tokenpacker {modeling_tokenpacker.__version__}, transformers {transformers.__version__}, "
            f"torch {torch.__version__}")


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')


def write_model_card(converter, folder, result):
    """README.md of the output: metadata, usage and the provenance of `converter`'s run."""
    from modeling_tokenpacker.modeling_tokenpacker_card import build_model_card

    preset = converter.preset or {}
    base_model, verified, ignored, tower = _common(converter, result)
    provenance = f"""## Conversion provenance

Converted from the original LLaVA-1.5-fork checkpoint.

| | |
|---|---|
| source config.json sha256 | `{sha256_file(converter.config_path)}` |
| vision tower | {tower} |
| tokenizer | the original's + `<image>` (id {converter.image_token_id}) and `<pad>` (id {converter.pad_token_id}); embeddings resized {converter.source_vocab_rows} -> {converter.vocab_rows} rows (new rows = mean of the old ones) |
| preset | {preset.get('name', 'none')} |
| dtype | {converter.dtype} |
| tensors | {result.source_tensors} read, {result.mapped_tensors} mapped, {sum(result.ignored.values())} ignored ({ignored}) |
| verification | {verified} |
| converter | `conversion/convert_tokenpacker_to_hf.py` {CONVERTER_VERSION}, {_versions()} |
| date (UTC) | {_now()} |
"""
    card = build_model_card(converter.config, repo_id=converter.push_to_hub, license=preset.get("license", "other"),
                            base_model=base_model, title=f"{preset.get('name', 'TokenPacker')} (transformers format)",
                            extra_sections=provenance)
    card.save(os.path.join(folder, "README.md"))


def describe_vlora(config):
    """One paragraph on what a VLoRA checkpoint computes, from its config."""
    layers = config.patched_layers
    targets = ", ".join(f"`{letter}` ({LETTER_NAMES[letter]})" for letter in config.delta_targets)
    generators = (f"{len(config.delta_targets)} sub-generators of {config.num_slots} queries" if config.separate_generators
                  else f"one shared sub-generator of {len(config.delta_targets) * config.num_slots} queries")
    return (f"No visual token enters the language model: a CLIP vision tower feeds VLoRA's perceptual weights generator "
            f"(width {config.generator_hidden_size}, {config.generator_num_layers} blocks, {generators}), which turns "
            f"each image into rank-{config.lora_rank} deltas `x A Bᵀ` (scale {config.lora_scaling:g}) on {targets} of "
            f"{len(layers)} of the {config.text_config.num_hidden_layers} LLaMA layers (0-based {layers}). A prompt "
            f"holds one `<image>` placeholder per image; images are prepared in `{config.image_aspect_ratio}` mode and "
            "prompts follow the vicuna_v1 chat template.")


def write_vlora_model_card(converter, folder, result):
    """README.md of a converted VLoRA folder: metadata, description, usage, provenance, what was dropped."""
    from huggingface_hub import ModelCard, ModelCardData
    from modeling_tokenpacker.modeling_tokenpacker_card import LICENSE_LINKS, USAGE

    preset = converter.preset or {}
    base_model, verified, ignored, tower = _common(converter, result)
    fields = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": list(VLORA_TAGS)}
    license = preset.get("license", "other")
    if license in LICENSE_LINKS:
        name, link = LICENSE_LINKS[license]
        fields.update(license="other", license_name=name, license_link=link)
    else:
        fields["license"] = license
    if base_model:
        fields["base_model"] = base_model
    dropped = "".join(f"\n- {line}." for line in result.dropped) or " nothing."
    preset_row = preset.get("name", "none") + ("" if preset.get("verified", True) else
                                               f" (unverified: {preset.get('note', 'values derived, not read')})")
    title = f"{preset.get('name', 'VLoRA')} (transformers format)"
    text = f"""---
{ModelCardData(**fields).to_yaml()}
---

# {title}

[VLoRA]({VLORA_PAPER}) (arXiv 2405.20339, "Visual Perception by Large Language Model's Weights") for 🤗 transformers,
with remote code (`trust_remote_code=True`). Original code: [FeipengMa6/VLoRA]({VLORA_REPOSITORY}).

{describe_vlora(converter.config)}

## Usage

{USAGE.format(repo=converter.push_to_hub or "path/or/repo-id")}

`generate` numbers decoded tokens as a full forward does (`generation_positions="full_forward"`, the convention the
model was trained with); pass `generation_positions="original"` to reproduce the original `generate`'s tokens.

## Conversion provenance

Converted from the original VLoRA checkpoint (`model_type: llava_vlora`).

| | |
|---|---|
| source config.json sha256 | `{sha256_file(converter.config_path)}` |
| vision tower | {tower} |
| tokenizer | the original's + `<image>` (id {converter.image_token_id}, outside the {converter.vocab_rows}-row vocabulary: the placeholder is embedded as id 0 and masked); pad = `<unk>` (id {converter.pad_token_id}); embeddings not resized |
| preset | {preset_row} |
| dtype | {converter.dtype} |
| tensors | {result.source_tensors} read, {result.mapped_tensors} mapped, {sum(result.ignored.values())} ignored ({ignored}) |
| verification | {verified} |
| converter | `conversion/convert_vlora_to_hf.py` {CONVERTER_VERSION}, {_versions()} |
| date (UTC) | {_now()} |

Dropped (computed by the original but never used, so not converted):{dropped}
"""
    ModelCard(text).save(os.path.join(folder, "README.md"))

"""The model card (README.md) written into a converted folder: the checkpoint's own card
(`modeling_tokenpacker_card.build_model_card`, the one `push_to_hub` writes) plus the conversion's provenance. No
local folder name is written."""

import datetime
import os

import torch

from . import CONVERTER_VERSION
from .common import looks_like_hub_id, sha256_file


def write_model_card(converter, folder, result):
    """README.md of the output: metadata, usage and the provenance of `converter`'s run."""
    import modeling_tokenpacker
    import transformers
    from modeling_tokenpacker.modeling_tokenpacker_card import build_model_card

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
| converter | `conversion/convert_tokenpacker_to_hf.py` {CONVERTER_VERSION}, modeling_tokenpacker {modeling_tokenpacker.__version__}, transformers {transformers.__version__}, torch {torch.__version__} |
| date (UTC) | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} |
"""
    card = build_model_card(converter.config, repo_id=converter.push_to_hub, license=preset.get("license", "other"),
                            base_model=base_model, title=f"{preset.get('name', 'TokenPacker')} (transformers format)",
                            extra_sections=provenance)
    card.save(os.path.join(folder, "README.md"))

"""The model card (README.md) written into a converted folder."""

import datetime
import os

import torch

from . import CONVERTER_VERSION
from .common import looks_like_hub_id, sha256_file


def write_model_card(converter, folder, result):
    """README.md of the output: metadata, usage and provenance of `converter`'s run."""
    import modeling_tokenpacker
    import transformers

    preset = converter.preset or {}
    base_models = []
    if converter.input and not os.path.exists(converter.input) and looks_like_hub_id(converter.input):
        base_models.append(converter.input)
    elif preset.get("base_llm"):
        base_models.append(preset["base_llm"])
    license_name = preset.get("license", "other")
    source_name = os.path.basename(os.path.normpath(converter.input_dir))
    lines = ["---", f"license: {license_name}", "library_name: transformers", "pipeline_tag: image-text-to-text"]
    if base_models:
        lines.append("base_model:")
        lines.extend(f"- {name}" for name in base_models)
    lines += ["tags:", "- tokenpacker", "- llava", "- multimodal", "- image-text-to-text", "---", ""]
    title = preset.get("name", source_name)
    tokens = converter.config.image_seq_length
    verified = ("not run (--no-verify)" if result.verified_tensors is None else
                f"{result.verified_tensors} tensors equal bit for bit after loading with "
                "`AutoModelForImageTextToText(trust_remote_code=True)` in a fresh process")
    hd_note = (f"\nTokenPacker-HD: the processor cuts each image into up to {converter.patch_num} blocks of 336 px "
               "plus a global view, as the original evaluation does.\n"
               if converter.image_aspect_ratio == "slice" else "")
    body = f"""# {title} (transformers format)

TokenPacker ([arXiv 2407.02392](https://arxiv.org/abs/2407.02392)) converted from the original LLaVA-1.5-fork
checkpoint to a 🤗 transformers model with remote code: projector `{converter.projector_type}`
(scale factor {converter.scale_factor}, {tokens} visual tokens per 336-px block), image aspect ratio
`{converter.image_aspect_ratio}`, vicuna_v1 chat template.
{hd_note}
## Usage

```python
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

path = "{converter.push_to_hub or 'path/to/this/folder'}"
model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=[Image.open("image.jpg")], text=[prompt], return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
```

## Conversion provenance

| | |
|---|---|
| source folder | `{source_name}` |
| source config.json sha256 | `{sha256_file(converter.config_path)}` |
| vision tower | {'embedded copy in the checkpoint' if converter.use_embedded_tower else f'`{os.path.basename(os.path.normpath(converter.clip_dir))}` (--vision-tower)'} |
| tokenizer | `{os.path.basename(os.path.normpath(converter.tokenizer_dir))}` + `<image>` (id {converter.image_token_id}) and `<pad>` (id {converter.pad_token_id}); embeddings resized {converter.source_vocab_rows} -> {converter.vocab_rows} rows (new rows = mean of the old ones) |
| preset | {preset.get('name', 'none')} |
| dtype | {converter.dtype} |
| tensors | {result.source_tensors} read, {result.mapped_tensors} mapped, {sum(result.ignored.values())} ignored ({', '.join(f'{c} x {r}' for r, c in sorted(result.ignored.items())) or 'none'}) |
| verification | {verified} |
| converter | `conversion/convert_tokenpacker_to_hf.py` {CONVERTER_VERSION}, modeling_tokenpacker {modeling_tokenpacker.__version__}, transformers {transformers.__version__}, torch {torch.__version__} |
| date (UTC) | {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S')} |
"""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + body)

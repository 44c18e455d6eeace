"""The model card of a TokenPacker checkpoint, written with huggingface_hub's `ModelCard` / `ModelCardData`: by
`push_to_hub` and by the converter (which adds its provenance).

Shipped inside checkpoints as remote code. It imports huggingface_hub, which every transformers release requires
(transformers' own push_to_hub writes its cards with it), and only when a card is made: loading a checkpoint never
needs it.
"""

PAPER = "https://arxiv.org/abs/2407.02392"
ORIGINAL_REPOSITORY = "https://github.com/CircleRadon/TokenPacker"
LICENSE_LINKS = {  # licenses the Hub does not list by name get license: other, with a name and a link
    "llama2": ("llama2", "https://ai.meta.com/llama/license/"),
}
TAGS = ["tokenpacker", "llava", "multimodal", "image-text-to-text", "custom_code"]
MODEL_NAMES = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP", "llama": "LLaMA", "mistral": "Mistral",
               "qwen2": "Qwen2"}

USAGE = '''```python
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{repo}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "image", "url": "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg"}},
    {{"type": "text", "text": "What is in the image?"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```'''


def card_data(license=None, base_model=None):
    """`ModelCardData` of a TokenPacker checkpoint (`license` a Hub identifier or a key of LICENSE_LINKS)."""
    from huggingface_hub import ModelCardData

    fields = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": list(TAGS)}
    if license in LICENSE_LINKS:
        name, link = LICENSE_LINKS[license]
        fields.update(license="other", license_name=name, license_link=link)
    elif license:
        fields["license"] = license
    if base_model:
        fields["base_model"] = base_model
    return ModelCardData(**fields)


def describe_config(config):
    """One paragraph on what the checkpoint computes, from its config."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    if config.projector_type == "tokenpacker":
        projector = (f"the TokenPacker projector (scale factor {config.scale_factor}: {config.image_seq_length} visual "
                     f"tokens per {config.vision_config.image_size}-px block instead of {grid * grid})")
    elif config.projector_type == "mlp2x_gelu":
        projector = f"LLaVA-1.5's `mlp2x_gelu` projector ({config.image_seq_length} visual tokens per image)"
    else:
        naive = {"avg_pool": "average pooling", "resampler": "a learned-query resampler"}[config.projector_type]
        projector = (f"a baseline projector, {naive} followed by an MLP ({config.image_seq_length} visual tokens per "
                     f"{config.vision_config.image_size}-px block instead of {grid * grid})")
    mode = config.image_aspect_ratio
    if mode == "slice":
        mode = f"`slice` (TokenPacker-HD: up to {config.patch_num} blocks plus a global view per image)"
    else:
        mode = f"`{mode}`"
    vision = MODEL_NAMES.get(config.vision_config.model_type, config.vision_config.model_type)
    text = MODEL_NAMES.get(config.text_config.model_type, config.text_config.model_type)
    return (f"A {vision} vision tower, {projector} and a {text} "
            f"language model of {config.text_config.num_hidden_layers} layers of width {config.text_config.hidden_size}"
            f"; images are prepared in {mode} mode and prompts follow the vicuna_v1 chat template.")


def build_model_card(config, repo_id=None, license=None, base_model=None, title=None, extra_sections=""):
    """The model card (a `huggingface_hub.ModelCard`) of a checkpoint with `config`; `extra_sections` (Markdown)
    go at the end. No local path is written: the usage snippet names `repo_id` or a placeholder."""
    from huggingface_hub import ModelCard

    title = title or (repo_id.split("/")[-1] if repo_id else "TokenPacker")
    text = "\n".join([
        "---", card_data(license, base_model).to_yaml(), "---", "",
        f"# {title}", "",
        f"[TokenPacker]({PAPER}) (arXiv 2407.02392) for 🤗 transformers, with remote code "
        f"(`trust_remote_code=True`). Original code: [CircleRadon/TokenPacker]({ORIGINAL_REPOSITORY}).", "",
        describe_config(config), "",
        "## Usage", "",
        USAGE.format(repo=repo_id or "path/or/repo-id"), "",
        extra_sections,
    ])
    return ModelCard(text.rstrip() + "\n")

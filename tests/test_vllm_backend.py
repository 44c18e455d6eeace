"""The model and processor called exactly as vLLM's Transformers backend calls them (vllm 0.32,
`vllm/model_executor/models/transformers/`), without vLLM: the processor on placeholder-only text with
`return_text_replacement_offsets`, each replacement encoded on its own and put in place of the placeholder of a
prompt tokenized whole, `_get_num_multimodal_tokens` for budgets and for slicing `pixel_values` per image, the base
model built by `AutoModel.from_config` with a registered attention function on the text config,
`get_image_features(pixel_values, return_dict=True, ...).pooler_output`, embeddings put where the replacement holds
image tokens, and `forward(inputs_embeds=..., position_ids=..., use_cache=False, return_dict=False)`.

The real vLLM run is `benchmarks/vllm_serving.py` (opt-in: tests/test_vllm_serving.py).
"""

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from llama_processor import make_processor, sentencepiece_tokenizer
from modeling_tokenpacker.demo import build_tiny_model, build_tiny_tokenizer, synthesize_image
from test_remote_code import BLOCK_PACKAGE

PROMPT = "A chat. USER: <image>\nDescribe the image briefly. ASSISTANT:"
TWO_IMAGES = "USER: <image>\nCompare this picture <image>\nwith that one. ASSISTANT:"
SIZES = [(480, 360), (1000, 300)]


def vllm_prompt_ids(processor, prompt, images, chat=False, **kwargs):
    """The ids vLLM feeds the model: the HF processor runs on placeholder-only text (vLLM's dummy text) and
    reports each image's replacement text; the prompt is tokenized whole (with special tokens for a prompt, without
    for a rendered chat: `LLM.chat` and the OpenAI server), and each placeholder id is replaced by its image's
    replacement encoded on its own (`add_special_tokens=False`). Also returns the replacements' ids."""
    tokenizer = processor.tokenizer
    out = processor(text=processor.image_token * len(images), images=images, return_text_replacement_offsets=True,
                    return_tensors="pt", **kwargs)
    replacements = [tokenizer.encode(entry["replacement"], add_special_tokens=False)
                    for entry in out["text_replacement_offsets"][0]]
    ids, used = [], 0
    for token in tokenizer.encode(prompt, add_special_tokens=not chat):
        if token == processor.image_token_id:
            ids.extend(replacements[used])
            used += 1
        else:
            ids.append(token)
    assert used == len(images)
    return ids, replacements, out


@pytest.mark.parametrize("mode", ["pad", "slice"])
@pytest.mark.parametrize("prompt, count", [(PROMPT, 1), (TWO_IMAGES, 2)])
def test_vllm_prompt_ids_equal_the_processors_with_a_llama_tokenizer(mode, prompt, count):
    processor = make_processor(sentencepiece_tokenizer(), mode)
    images = [synthesize_image(*size) for size in SIZES[:count]]
    ours = processor(text=prompt, images=images)["input_ids"][0]
    theirs, _, _ = vllm_prompt_ids(processor, prompt, images)
    assert theirs == ours
    # The original puts a lone '▁' before the newline after each image; tokenizing the prompt whole does not, so
    # the replacement carries it.
    assert processor.image_boundary() == ((processor.tokenizer.convert_tokens_to_ids("▁"),), "▁")


def test_vllm_prompt_ids_equal_the_processors_for_a_chat_template_prompt():
    processor = make_processor(sentencepiece_tokenizer(), "slice")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [synthesize_image(*size) for size in SIZES]
    ours = processor(text=prompt, images=images)["input_ids"][0]
    assert ours.count(processor.tokenizer.bos_token_id) == 1
    assert vllm_prompt_ids(processor, prompt, images, chat=True)[0] == ours


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_replacements_encode_to_each_images_ids(mode):
    processor = make_processor(sentencepiece_tokenizer(), mode)
    images = [synthesize_image(*size) for size in SIZES]
    _, replacements, out = vllm_prompt_ids(processor, TWO_IMAGES, images)
    grids = out.get("image_grids")
    boundary = list(processor.image_boundary()[0])
    for index, ids in enumerate(replacements):
        grid = None if grids is None else grids[index].tolist()
        assert ids == processor.image_placeholder_ids(grid) + boundary
    entry = out["text_replacement_offsets"][0][1]
    assert processor.replace_image_token(dict(out), 1) == entry["replacement"]


def test_a_tokenizer_that_prefixes_every_text_is_warned_about_for_hd_separators(caplog):
    """A Metaspace tokenizer with prepend_scheme='always' turns the ',' between two image tokens into '▁,' when the
    replacement is encoded on its own: the processor says so once instead of letting vLLM feed other ids."""
    processor = make_processor(build_tiny_tokenizer(), "slice")
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            _, replacements, out = vllm_prompt_ids(processor, PROMPT, [synthesize_image(1000, 300)])
    finally:
        hf_logging.disable_propagation()
    assert replacements[0] != processor.image_placeholder_ids(out["image_grids"][0].tolist())
    assert "separator ids" in caplog.text and "'▁,'" in caplog.text
    # Pad mode has no separators: the same tokenizer's replacements are exact and nothing is said.
    caplog.clear()
    pad = make_processor(build_tiny_tokenizer(), "pad")
    _, replacements, _ = vllm_prompt_ids(pad, PROMPT, [synthesize_image(1000, 300)])
    assert replacements[0] == pad.image_placeholder_ids() and "separator ids" not in caplog.text


@pytest.mark.parametrize("mode, patch_num", [("pad", 9), ("square", 9), ("slice", 9), ("slice", 16), ("slice", 25)])
def test_num_multimodal_tokens_match_what_the_processor_produces(mode, patch_num):
    processor = make_processor(sentencepiece_tokenizer(), mode)
    sizes = [(336, 336), (360, 480), (300, 1000), (1000, 300), (2000, 2100), (17, 900)]
    images = [synthesize_image(width, height) for height, width in sizes]
    counts = processor._get_num_multimodal_tokens(image_sizes=sizes, patch_num=patch_num)
    out = processor(text=processor.image_token * len(images), images=images, patch_num=patch_num,
                    return_tensors="pt")
    grids = out.get("image_grids")
    blocks = [1] * len(images) if grids is None else [
        int(r * c + (r * c > 1)) for r, c in grids.tolist()]
    assert list(counts["num_image_patches"]) == blocks and sum(blocks) == out["pixel_values"].shape[0]
    image_tokens = (out["input_ids"][0] == processor.image_token_id).sum().item()
    assert list(counts["num_image_tokens"]) == [b * processor.image_seq_length for b in blocks]
    assert sum(counts["num_image_tokens"]) == image_tokens


CHILD = BLOCK_PACKAGE + textwrap.dedent(
    """
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AttentionInterface, AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    path, image_paths, prompt = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    calls = []

    def backend_attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(type(module).__name__)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("backend_like", backend_attention)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    config.get_text_config()._attn_implementation = "backend_like"
    config.dtype = torch.float32
    with torch.device("meta"):
        probe = AutoModel.from_config(config, trust_remote_code=True)
    decoder = type(probe.get_decoder()).__name__
    base = AutoModel.from_config(config, trust_remote_code=True).eval()
    weights = load_file(path + "/model.safetensors")
    # vLLM drops every checkpoint weight that the base model's `_keys_to_ignore_on_load_unexpected` matches.
    dropped = [k for k in weights for p in (base._keys_to_ignore_on_load_unexpected or []) if re.search(p, k)]
    lm_head = weights.pop("lm_head.weight", None)
    missing, unexpected = base.load_state_dict({k[len("model."):]: v for k, v in weights.items()}, strict=False)
    if lm_head is None:
        lm_head = base.get_input_embeddings().weight

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    images = [Image.open(p).convert("RGB") for p in image_paths]
    out = processor(text=processor.image_token * len(images), images=images, return_text_replacement_offsets=True,
                    return_tensors="pt")
    replacements = [processor.tokenizer.encode(e["replacement"], add_special_tokens=False)
                    for e in out["text_replacement_offsets"][0]]
    counts = processor._get_num_multimodal_tokens(image_sizes=[(i.height, i.width) for i in images])
    ids = []
    for token in processor.tokenizer.encode(prompt):
        ids.extend(replacements.pop(0) if token == processor.image_token_id else [token])
    ids = torch.tensor(ids)
    extra = {"image_grids": out["image_grids"]} if "image_grids" in out else {}
    with torch.no_grad():
        features = base.get_image_features(out["pixel_values"], return_dict=True, **extra).pooler_output
        features = list(features) if not isinstance(features, torch.Tensor) else torch.split(
            features, [n * features.shape[0] // sum(counts["num_image_patches"]) for n in counts["num_image_patches"]])
        embeds = base.get_input_embeddings()(ids)
        embeds[ids == processor.image_token_id] = torch.cat(features).to(embeds.dtype)
        calls.clear()
        hidden = base(input_ids=None, inputs_embeds=embeds[None], use_cache=False,
                      position_ids=torch.arange(len(ids))[None], return_dict=False)[0][0]
        logits = hidden @ lm_head.T
        model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True).eval()
        reference = model(**processor(text=prompt, images=images, return_tensors="pt")).logits[0]
    print(json.dumps({
        "base": type(base).__name__, "decoder": decoder, "missing": missing, "unexpected": unexpected,
        "dropped": dropped, "has_lm_head": lm_head is not base.get_input_embeddings().weight,
        "feature_tokens": [f.shape[0] for f in features], "num_image_tokens": list(counts["num_image_tokens"]),
        "attention_calls": calls, "layers": config.get_text_config().num_hidden_layers,
        "same_length": reference.shape[0] == logits.shape[0],
        "max_diff": (logits - reference).abs().max().item() if reference.shape == logits.shape else None,
    }))
    """
)


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_the_base_model_computes_the_models_logits_when_driven_as_vllm_drives_it(tmp_path, mode):
    tokenizer = sentencepiece_tokenizer()
    model = build_tiny_model(tokenizer)
    processor = make_processor(tokenizer, mode, model.config.image_seq_length)
    checkpoint = tmp_path / "ckpt"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    image_paths = []
    for index, size in enumerate(SIZES):
        image_paths.append(str(tmp_path / f"image{index}.png"))
        synthesize_image(*size).save(image_paths[-1])
    result = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(checkpoint), ",".join(image_paths), TWO_IMAGES],
        capture_output=True, text=True, cwd=tmp_path, timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    child = json.loads(result.stdout.strip().splitlines()[-1])
    assert child["base"] == "TokenPackerModel" and child["decoder"] == "LlamaModel"
    assert child["missing"] == [] and child["unexpected"] == []
    assert child["dropped"] == [] and child["has_lm_head"]
    assert child["feature_tokens"] == child["num_image_tokens"]
    # Only the language model's layers go through the backend's attention function, once each per forward.
    assert child["attention_calls"] == ["LlamaAttention"] * child["layers"]
    assert child["same_length"] and child["max_diff"] < 1e-4


def test_offsets_place_the_boundary_token_on_the_replacements_last_character():
    processor = make_processor(sentencepiece_tokenizer(), "pad")
    out = processor(text=PROMPT, images=synthesize_image(40, 30), return_offsets_mapping=True,
                    return_text_replacement_offsets=True)
    (entry,) = out["text_replacement_offsets"][0]
    expanded = PROMPT.replace("<image>", entry["replacement"], 1)
    ids, offsets = out["input_ids"][0], out["offset_mapping"][0]
    last_image = max(i for i, token in enumerate(ids) if token == processor.image_token_id)
    start, end = offsets[last_image + 1]
    assert expanded[start:end] == "▁" and end == entry["new_span"][1]
    assert expanded[offsets[last_image + 2][0]:].startswith("\nDescribe")

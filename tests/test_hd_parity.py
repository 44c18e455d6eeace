"""TokenPacker-HD ('slice', patch_num 9) parity with the original code, through the converter.

The original-format `hd9` checkpoint is rebuilt with `tests/original_format.py` (bit-identical to the one
`tests/fixtures/make_fixtures.py` ran the original's evaluation pipeline on), converted in float32 with
`conversion/convert_tokenpacker_to_hf.py`, loaded through the Auto classes with `trust_remote_code=True`, and
compared with `tests/fixtures/parity_hd.*` (see tests/fixtures/README.md) for each fixture image: the block grid,
the pixel values (sampled positions and sums), the input ids (the original's -200 placeholder expanded into the HD
layout written out here from the facts), the projector output's sum, the last 8 logits and 8 greedy tokens.

The vision tower of the hd9 checkpoint is CLIP-L-wide (1024 channels, 24 layers): about 2.5 s per 336-px block on
2 CPU cores. By default the model is compared on `square` (1x1, no global view) and `wide` (2x3 + global view,
7 blocks); set TOKENPACKER_FULL_HD_PARITY=1 to also run `hd_square` (3x3), `hd_wide` (2x4) and `hd_tall` (4x2)
(28 more blocks, about 70 s more). Grids, pixel values and input ids are checked for every image.
"""

import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for `conversion`

import original_format as of  # noqa: E402
from conftest import dtype_kwargs  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
IMAGE_PLACEHOLDER_ID = -200  # the original's IMAGE_TOKEN_INDEX
TOKENS_PER_BLOCK = 144  # scale_factor 2 on the 24 x 24 CLIP grid
TOLERANCE = {"pixel_values": 1e-6, "logits": 1e-4, "projector_output_sum": 1e-2}
with open(os.path.join(FIXTURES, "parity_hd.json"), encoding="utf-8") as _handle:
    FIXTURE_IMAGES = list(json.load(_handle)["images"])  # hd_square, hd_wide, hd_tall, square, wide
MODEL_IMAGES = ["square", "wide"]
if os.environ.get("TOKENPACKER_FULL_HD_PARITY") == "1":
    MODEL_IMAGES += ["hd_square", "hd_wide", "hd_tall"]
MEASURED = {}  # (image, quantity) -> value, printed at the end of the module


def _record(image, quantity, value):
    MEASURED[(image, quantity)] = value
    print(f"[hd parity] {image} {quantity}: {value:.3e}")
    return value


@pytest.fixture(scope="module", autouse=True)
def _print_measurements():
    yield
    if MEASURED:
        lines = ["", "hd9 parity |ours - original| (float32):"]
        for (image, quantity), value in sorted(MEASURED.items()):
            lines.append(f"  {image:10s} {quantity:32s} {value:.3e}")
        print("\n".join(lines))


@pytest.fixture(scope="module")
def reference():
    with open(os.path.join(FIXTURES, "parity_hd.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    return {"json": info, "tensors": load_file(os.path.join(FIXTURES, "parity_hd.safetensors"))}


@pytest.fixture(scope="module")
def hd9(tmp_path_factory):
    """The converted hd9 checkpoint: model (float32), processor, and the processor's inputs per fixture image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    root = tmp_path_factory.mktemp("original_hd9")
    original = of.build_original_checkpoint(str(root), "hd9")
    output = tmp_path_factory.mktemp("converted_hd9") / "ckpt"
    convert(str(output), input=original.path, vision_tower=original.clip_path, dtype="float32", verify=False,
            progress=False)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True,
                                                        **dtype_kwargs(torch.float32)).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    return {"model": model, "processor": processor, "images": of.make_images()}


@pytest.fixture(scope="module")
def inputs(hd9, reference):
    prompt = reference["json"]["provenance"]["prompt"]
    return {name: hd9["processor"](images=[hd9["images"][name]], text=[prompt], return_tensors="pt")
            for name in reference["json"]["images"]}


def expected_input_ids(original_ids, rows, cols, image_token_id, comma_id, newline_id):
    """The original's ids with its -200 placeholder replaced by the HD layout the original's model splices in:
    each row's blocks separated by `,`, `\\n` after each row, then the global view and `\\n` if rows*cols > 1."""
    layout = []
    for _ in range(rows):
        for col in range(cols):
            layout += [image_token_id] * TOKENS_PER_BLOCK + ([comma_id] if col < cols - 1 else [])
        layout.append(newline_id)
    if rows * cols > 1:
        layout += [image_token_id] * TOKENS_PER_BLOCK + [newline_id]
    expanded = []
    for token in original_ids:
        expanded += layout if token == IMAGE_PLACEHOLDER_ID else [token]
    return expanded


def test_converted_folder_is_an_hd_processor(hd9, reference):
    processor = hd9["processor"]
    assert processor.image_processor.image_aspect_ratio == "slice"
    assert processor.image_processor.patch_num == reference["json"]["patch_num"] == hd9["model"].config.patch_num
    separators = reference["json"]["separator_ids"]
    assert list(processor.slice_separator_ids) == [separators["sep ','"][0], separators["ret '\\n'"][0]]
    assert processor.slice_separator_ids[1] == processor.tokenizer.unk_token_id  # no '\n' piece in the vocabulary


@pytest.mark.parametrize("name", FIXTURE_IMAGES)
def test_grid_pixel_values_and_input_ids_match(name, inputs, reference, hd9):
    info = reference["json"]["images"][name]
    run = inputs[name]
    assert run["image_grids"].tolist() == [[info["h_block"], info["w_block"]]]
    pixels = run["pixel_values"]
    assert list(pixels.shape) == info["pixel_values_shape"]
    index = reference["tensors"][f"hd9.{name}.pixel_sample_index"]
    sample = reference["tensors"][f"hd9.{name}.pixel_sample_values"]
    sample_diff = float((pixels.reshape(-1)[index] - sample).abs().max())
    assert _record(name, "pixel_values (4096 samples)", sample_diff) <= TOLERANCE["pixel_values"]
    sums = {"pixel_values_sum": pixels.double().sum(), "pixel_values_abs_sum": pixels.double().abs().sum()}
    for key, value in sums.items():
        diff = abs(float(value) - info[key])
        assert _record(name, key, diff) <= TOLERANCE["pixel_values"] * pixels.numel(), key

    separators = reference["json"]["separator_ids"]
    expected = expected_input_ids(info["input_ids"], info["h_block"], info["w_block"],
                                  hd9["model"].config.image_token_id, separators["sep ','"][0],
                                  separators["ret '\\n'"][0])
    ids = run["input_ids"][0].tolist()
    assert ids == expected
    assert len(ids) == info["sequence_length"]
    image_positions = len(ids) - (len(info["input_ids"]) - 1)
    assert image_positions == info["image_positions"]


@pytest.fixture(scope="module")
def model_runs(hd9, inputs):
    """Our logits, projector output and 8 KV-cached greedy tokens for MODEL_IMAGES. The vision tower runs once per
    image: `generate` gets the features the forward computed (the same pixel values, checked equal)."""
    model = hd9["model"]
    compute = model.model.pack_images
    cache = {}

    def cached_pack_images(pixel_values, *args, **kwargs):
        key = (tuple(pixel_values.shape), float(pixel_values.double().sum()))
        if key not in cache or not torch.equal(cache[key][0], pixel_values):
            cache[key] = (pixel_values.clone(), compute(pixel_values, *args, **kwargs))
        return cache[key][1]

    model.model.pack_images = cached_pack_images
    runs = {}
    try:
        for name in MODEL_IMAGES:
            with torch.inference_mode():
                out = model(**inputs[name])
                generated = model.generate(**inputs[name], max_new_tokens=8, min_new_tokens=8, do_sample=False)
            runs[name] = {"logits": out.logits[0], "projector_output": out.image_hidden_states,
                          "greedy_tokens": generated[0, inputs[name]["input_ids"].shape[1]:].tolist()}
            cache.clear()
    finally:
        del model.model.pack_images
    return runs


@pytest.mark.parametrize("name", MODEL_IMAGES)
def test_projector_output_logits_and_greedy_tokens_match(name, model_runs, reference):
    info = reference["json"]["images"][name]
    run = model_runs[name]
    assert list(run["projector_output"].shape) == info["projector_output_shape"]
    sum_diff = abs(float(run["projector_output"].double().sum()) - info["projector_output_sum"])
    assert _record(name, "projector_output_sum", sum_diff) <= TOLERANCE["projector_output_sum"]
    assert run["logits"].shape[0] == info["sequence_length"]
    reference_logits = reference["tensors"][f"hd9.{name}.logits_last8"]
    ours = run["logits"][-reference_logits.shape[0]:, : reference_logits.shape[1]]
    assert _record(name, "logits_last8", float((ours - reference_logits).abs().max())) <= TOLERANCE["logits"]
    print(f"[hd parity] {name} greedy tokens: ours {run['greedy_tokens']} original {info['greedy_tokens']}")
    assert run["greedy_tokens"] == info["greedy_tokens"]

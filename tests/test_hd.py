"""TokenPacker-HD ('slice' mode) end to end: block-grid choice, pixel layout, the HD token sequence, the model's
image_grids checks, batched generation, extreme image sizes and the memory bound.

References are written here from the facts (tests/fixtures/README.md, shared/original-tokenpacker.md): the
patch-table score in float32, the pixel pipeline with torch's own `F.interpolate` on the fully normalised image,
and the separator layout. Parity with the original code itself is in tests/test_hd_parity.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from modeling_tokenpacker import (
    TokenPackerConfig,
    TokenPackerImageProcessor,
    TokenPackerProcessor,
    load_chat_template,
)
from modeling_tokenpacker.demo import build_tiny_model, synthesize_image
from modeling_tokenpacker.image_processing_tokenpacker import choose_block_grid
from modeling_tokenpacker.modeling_tokenpacker import check_image_grids
from conftest import record_forward_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 336
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"

# The original's candidate grids (rows x cols), in table order (the first best score wins).
CANDIDATES_9 = "1x1 1x2 2x1 1x3 3x1 2x2 1x4 4x1 1x5 5x1 1x6 6x1 2x3 3x2 1x7 7x1 4x2 2x4 1x8 8x1 3x3 1x9 9x1"
CANDIDATES_16 = CANDIDATES_9 + " 2x5 5x2 2x6 6x2 3x4 4x3 2x7 7x2 3x5 5x3 2x8 8x2 4x4"
CANDIDATES_25 = (CANDIDATES_16 + " 3x6 6x3 2x9 9x2 4x5 5x4 2x10 10x2 3x7 7x3 11x2 2x11 4x6 6x4 12x2 2x12 3x8 8x3"
                 " 4x6 6x4 5x5")
CANDIDATES = {p: [tuple(int(v) for v in item.split("x")) for item in text.split()]
              for p, text in ((9, CANDIDATES_9), (16, CANDIDATES_16), (25, CANDIDATES_25))}


def reference_grids(heights, widths, patch_num):
    """The patch-table score, vectorised over images, in float32 as the original's torch code computes it:
    coverage of the grid box by the image scaled to fit it (sides rounded half to even) + 0.1 * IoU of the grid box
    with the image box scaled by 1.4 (denominator + 1e-5); the first maximum wins."""
    grids = torch.tensor(CANDIDATES[patch_num], dtype=torch.float32)
    box_h, box_w = grids[:, 0] * BLOCK, grids[:, 1] * BLOCK  # [N]
    area = box_h * box_w
    h = torch.as_tensor(heights, dtype=torch.float32)[:, None]  # [S, 1]
    w = torch.as_tensor(widths, dtype=torch.float32)[:, None]
    ratio = torch.minimum(box_h / h, box_w / w)
    score = torch.round(h * ratio) * torch.round(w * ratio) / area
    big_h, big_w = h * 1.4, w * 1.4
    inter = torch.minimum(box_h, big_h) * torch.minimum(box_w, big_w)
    iou = inter / ((area + big_h * big_w - inter) + 1e-5)
    best = torch.argmax(score + iou * 0.1, dim=1)
    return [CANDIDATES[patch_num][i] for i in best.tolist()]


def reference_slice(image, patch_num=9):
    """The HD pixel pipeline on the fully normalised float32 image with torch ops (small images only)."""
    x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    x = x.sub(torch.tensor(MEAN)[:, None, None]).div(torch.tensor(STD)[:, None, None])[None]
    h, w = image.height, image.width
    rows, cols = reference_grids([h], [w], patch_num)[0]

    def fit(box_h, box_w):
        if box_h / h <= box_w / w:
            return box_h, max(1, min(box_w, round(w * box_h / h)))
        return max(1, min(box_h, round(h * box_w / w))), box_w

    canvas = torch.zeros(1, 3, rows * BLOCK, cols * BLOCK)
    fh, fw = fit(rows * BLOCK, cols * BLOCK)
    canvas[:, :, :fh, :fw] = F.interpolate(x, size=(fh, fw), mode="bilinear", align_corners=False)
    blocks = [canvas[:, :, i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK]
              for i in range(rows) for j in range(cols)]
    if len(blocks) > 1:
        gh, gw = fit(BLOCK, BLOCK)
        view = torch.zeros(1, 3, BLOCK, BLOCK)
        view[:, :, :gh, :gw] = F.interpolate(canvas, size=(gh, gw), mode="bilinear", align_corners=False)
        blocks.append(view)
    return torch.cat(blocks), (rows, cols)


def visual_positions(rows, cols, tokens_per_block):
    """Image tokens + separators of one image: L*(blocks + g) + rows*(cols-1) commas + rows newlines + g."""
    g = int(rows * cols > 1)
    return tokens_per_block * (rows * cols + g) + rows * (cols - 1) + rows + g


@pytest.fixture(scope="module")
def slice_processor(tokenizer):
    return TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=9), tokenizer,
                                image_seq_length=144, chat_template=load_chat_template())


@pytest.fixture(scope="module")
def hd_model(tokenizer):
    """The demo's tiny model with room for long HD prompts (4096 positions)."""
    text_config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096}
    return build_tiny_model(tokenizer, text_config=text_config, seed=1)


# ----------------------------------------------------------------------------------------------------------------
# Grid choice

SIDES = [1, 2, 3, 5, 17, 100, 200, 250, 300, 335, 336, 337, 400, 451, 500, 600, 671, 672, 673, 700, 800, 1000, 1007,
         1008, 1009, 1088, 1200, 1344, 1500, 2000, 2016, 3000, 4000, 5000, 10000]


@pytest.mark.parametrize("patch_num", [9, 16, 25])
def test_grid_is_the_first_best_patch_table_score(patch_num):
    rng = np.random.default_rng(patch_num)
    sizes = [(h, w) for h in SIDES for w in SIDES] + [tuple(s) for s in rng.integers(1, 6000, size=(1500, 2))]
    expected = reference_grids([h for h, _ in sizes], [w for _, w in sizes], patch_num)
    for (h, w), grid in zip(sizes, expected):
        assert choose_block_grid(h, w, patch_num) == grid, (h, w)


@pytest.mark.parametrize("size_wh, patch_num, grid", [
    ((336, 336), 9, (1, 1)), ((700, 700), 9, (3, 3)), ((1000, 400), 9, (2, 4)), ((400, 1000), 9, (4, 2)),
    ((400, 300), 9, (2, 3)), ((1344, 1344), 16, (4, 4)), ((1344, 1344), 25, (5, 5)), ((2000, 500), 16, (2, 8)),
])
def test_grids_the_original_chose(size_wh, patch_num, grid):
    """Grids recorded from the original's run (tests/fixtures/parity_hd.json) and read off its table."""
    assert choose_block_grid(size_wh[1], size_wh[0], patch_num) == grid
    assert len(CANDIDATES[patch_num]) == {9: 23, 16: 36, 25: 57}[patch_num]


def test_patch_num_outside_the_tables_raises_everywhere(tokenizer):
    for bad in (4, 10, 36):
        with pytest.raises(ValueError, match=r"patch_num must be one of \(9, 16, 25\)"):
            TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=bad)
        with pytest.raises(ValueError, match=r"patch_num must be one of \(9, 16, 25\)"):
            TokenPackerConfig(image_aspect_ratio="slice", patch_num=bad)
        with pytest.raises(ValueError, match="patch_num"):
            choose_block_grid(100, 100, bad)
    TokenPackerConfig(image_aspect_ratio="pad", patch_num=10)  # only checked for 'slice'
    assert TokenPackerConfig(image_aspect_ratio="slice", patch_num=16).patch_num == 16


# ----------------------------------------------------------------------------------------------------------------
# Pixel layout


@pytest.mark.parametrize("size_wh, patch_num", [((400, 300), 9), ((150, 500), 9), ((5, 3), 16), ((1, 1), 9),
                                                 ((1000, 17), 25)])
def test_blocks_and_global_view_equal_the_torch_pipeline(size_wh, patch_num):
    image = synthesize_image(*size_wh)
    expected, grid = reference_slice(image, patch_num)
    out = TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=patch_num)(image, return_tensors="pt")
    assert out["image_grids"].tolist() == [list(grid)]
    assert out["image_grids"].dtype == torch.int64
    assert out["pixel_values"].shape == expected.shape
    assert float((out["pixel_values"] - expected).abs().max()) <= 1e-6


def test_blocks_are_cut_row_major_from_the_top_left_canvas():
    """A 1000x400 image (2x4 grid): the resized image fills 1344x538 of the 672x1344 canvas, top-left; block k is
    row k // 4, column k % 4. The global view is the whole padded canvas squeezed into the image's aspect ratio
    (336x134), so its last ~27 of 134 rows show the canvas padding (the original's quirk)."""
    out = TokenPackerImageProcessor(image_aspect_ratio="slice")(synthesize_image(1000, 400), return_tensors="pt")
    pixels = out["pixel_values"]
    assert out["image_grids"].tolist() == [[2, 4]] and pixels.shape == (9, 3, BLOCK, BLOCK)
    canvas = torch.cat([torch.cat(list(pixels[r * 4:(r + 1) * 4]), dim=2) for r in range(2)], dim=1)  # [3, 672, 1344]
    filled = (canvas != 0).any(0)
    assert filled[:538].all() and not filled[538:].any()  # round(400 * 1344 / 1000) = 538 rows of image
    view_rows = (pixels[8] != 0).any(0).any(1)
    assert view_rows[:100].all() and not view_rows[110:].any()  # image ~ 134 * 538 / 672 = 107 rows
    assert (pixels[8] != 0).any(0)[:100].all()  # the full width of the view holds the canvas


def test_pad_and_square_modes_have_no_image_grids(images):
    for mode in ("pad", "square"):
        out = TokenPackerImageProcessor(image_aspect_ratio=mode)(images)
        assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (len(images), 3, BLOCK, BLOCK)


def test_several_images_give_flat_blocks_and_one_grid_each():
    processor = TokenPackerImageProcessor(image_aspect_ratio="slice")
    images = [synthesize_image(400, 300), synthesize_image(336, 336), synthesize_image(150, 500)]
    out = processor(images)
    assert isinstance(out["image_grids"], np.ndarray) and out["image_grids"].dtype == np.int64
    singles = [processor(image)["pixel_values"] for image in images]
    assert out["image_grids"].tolist() == [[2, 3], [1, 1], [3, 1]]
    assert np.array_equal(out["pixel_values"], np.concatenate(singles))


def test_slice_settings_survive_save_and_load(tmp_path, slice_processor):
    slice_processor.save_pretrained(tmp_path)
    loaded = TokenPackerProcessor.from_pretrained(tmp_path)
    assert (loaded.image_processor.image_aspect_ratio, loaded.image_processor.patch_num) == ("slice", 9)
    image = synthesize_image(500, 300)
    a, b = slice_processor(images=[image], text=PROMPT), loaded(images=[image], text=PROMPT)
    assert a["input_ids"] == b["input_ids"] and np.array_equal(a["image_grids"], b["image_grids"])


# ----------------------------------------------------------------------------------------------------------------
# The HD token sequence


def test_separator_ids_are_token_string_lookups(slice_processor, tokenizer):
    comma, newline = slice_processor.slice_separator_ids
    assert comma == tokenizer.convert_tokens_to_ids(",") != tokenizer.unk_token_id
    assert newline == tokenizer.unk_token_id  # no "\n" token in the vocabulary


def test_sentencepiece_llama_vocabulary_gives_comma_piece_and_unk_for_newline():
    """The fixtures' LLaMA SentencePiece tokenizer, slow and fast: ',' is piece 959 and '\\n' has no piece, so the
    row separator is <unk> (0), as in the original's run (tests/fixtures/parity_hd.json)."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    folder = os.path.join(REPO, "tests", "fixtures", "tokenizer")
    for cls in (LlamaTokenizer, LlamaTokenizerFast):
        tokenizer = cls.from_pretrained(folder)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        processor = TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio="slice"), tokenizer)
        assert processor.slice_separator_ids == (959, 0) and tokenizer.unk_token_id == 0, cls.__name__


def _layout(ids, image_token_id):
    """Compress ids into ['[n]' for a run of n image tokens, else the id]."""
    out = []
    for token in ids:
        if token == image_token_id and out and isinstance(out[-1], list):
            out[-1][0] += 1
        elif token == image_token_id:
            out.append([1])
        else:
            out.append(token)
    return [f"[{item[0]}]" if isinstance(item, list) else item for item in out]


def test_one_block_is_one_run_and_a_row_separator_without_global_view(slice_processor):
    unk = slice_processor.tokenizer.unk_token_id
    assert _layout(slice_processor.image_placeholder_ids((1, 1)), slice_processor.image_token_id) == ["[144]", unk]


def test_two_by_three_layout(slice_processor):
    comma, newline = slice_processor.slice_separator_ids
    layout = _layout(slice_processor.image_placeholder_ids((2, 3)), slice_processor.image_token_id)
    row = ["[144]", comma, "[144]", comma, "[144]", newline]
    assert layout == row + row + ["[144]", newline]


@pytest.mark.parametrize("grid", [(1, 1), (1, 2), (2, 1), (3, 3), (1, 9), (4, 4), (2, 12), (5, 5)])
@pytest.mark.parametrize("tokens_per_block", [144, 64, 36])
def test_positions_per_image_follow_the_formula(tokenizer, grid, tokens_per_block):
    processor = TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio="slice"), tokenizer,
                                     image_seq_length=tokens_per_block)
    ids = processor.image_placeholder_ids(grid)
    rows, cols = grid
    g = int(rows * cols > 1)
    assert len(ids) == visual_positions(rows, cols, tokens_per_block)
    assert ids.count(processor.image_token_id) == tokens_per_block * (rows * cols + g)
    comma, newline = processor.slice_separator_ids
    assert ids.count(comma) == rows * (cols - 1) and ids.count(newline) == rows + g


def test_prompt_ids_are_the_pad_ids_with_the_run_replaced_by_the_hd_sequence(slice_processor, tokenizer):
    pad_processor = TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer, image_seq_length=144)
    images = [synthesize_image(400, 300), synthesize_image(336, 336)]
    text = "USER: <image> and <image>\nCompare. ASSISTANT:"
    hd = slice_processor(images=images, text=text)
    pad = pad_processor(images=images, text=text)["input_ids"][0]
    run = [slice_processor.image_token_id] * 144
    first = pad.index(slice_processor.image_token_id)
    second = first + 144 + pad[first + 144:].index(slice_processor.image_token_id)
    expected = (pad[:first] + slice_processor.image_placeholder_ids((2, 3)) + pad[first + 144:second]
                + slice_processor.image_placeholder_ids((1, 1)) + pad[second + 144:])
    assert hd["input_ids"][0] == expected and run == pad[first:first + 144]
    assert hd["image_grids"].tolist() == [[2, 3], [1, 1]]


# ----------------------------------------------------------------------------------------------------------------
# Property: image tokens == features the model produces, and the grid is the score's


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(1, 5000), st.integers(1, 5000)), min_size=1, max_size=2),
       patch_num=st.sampled_from([9, 16, 25]), tokens_per_block=st.sampled_from([144, 64, 36]))
def test_property_image_tokens_equal_model_features_and_grids_follow_the_score(tokenizer, sizes, patch_num,
                                                                               tokens_per_block):
    processor = TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=patch_num),
                                     tokenizer, image_seq_length=tokens_per_block)
    images = [Image.new("RGB", (w, h), (200, 30, 90)) for w, h in sizes]  # constant colour: cheap to build
    texts = [PROMPT] * len(images)
    out = processor(images=images, text=texts, return_tensors="pt")
    expected_grids = [reference_grids([h], [w], patch_num)[0] for w, h in sizes]
    assert [tuple(g) for g in out["image_grids"].tolist()] == expected_grids
    grids = check_image_grids(out["image_grids"], out["pixel_values"])  # the model's own check
    assert grids.tolist() == [list(g) for g in expected_grids]
    # The model scatters blocks x image_seq_length features into the image-token positions.
    image_tokens = int((out["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == out["pixel_values"].shape[0] * tokens_per_block
    lengths = out["attention_mask"].sum(1).tolist()
    base = len(processor.tokenize_with_images(PROMPT)) - tokens_per_block  # the text around a one-block image
    assert lengths == [base + visual_positions(r, c, tokens_per_block) for r, c in expected_grids]
    assert out["pixel_values"].shape[1:] == (3, BLOCK, BLOCK) and bool(torch.isfinite(out["pixel_values"]).all())


@pytest.mark.parametrize("size_wh", [(1, 1), (1, 4000), (700, 300), (333, 1000)])
def test_model_consumes_every_hd_layout(hd_model, slice_processor, size_wh):
    inputs = slice_processor(images=[Image.new("RGB", size_wh, (10, 120, 240))], text=PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = hd_model(**inputs)
    features = out.image_hidden_states
    assert features.shape[0] == inputs["pixel_values"].shape[0]
    assert features.shape[0] * features.shape[1] == int((inputs["input_ids"] == slice_processor.image_token_id).sum())
    assert bool(torch.isfinite(out.logits).all())


# ----------------------------------------------------------------------------------------------------------------
# Model: image_grids checks and generation


def test_model_checks_image_grids_against_pixel_values(hd_model, slice_processor):
    inputs = slice_processor(images=[synthesize_image(400, 300)], text=PROMPT, return_tensors="pt")  # 2x3 -> 7 blocks
    with pytest.raises(ValueError, match=r"describe 10 blocks .* pixel_values has 7"):
        hd_model(**{**inputs, "image_grids": torch.tensor([[3, 3]])})
    with pytest.raises(ValueError, match="integers of shape"):
        hd_model(**{**inputs, "image_grids": torch.tensor([[2.0, 3.0]])})
    with pytest.raises(ValueError, match="at least 1 row"):
        hd_model(**{**inputs, "image_grids": torch.tensor([[0, 3], [1, 7]])})
    without_pixels = {k: v for k, v in inputs.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="pass pixel_values"):
        hd_model(**without_pixels)
    assert check_image_grids([[2, 3]], inputs["pixel_values"]).tolist() == [[2, 3]]  # lists are fine too


def test_image_grids_reach_the_model_only_on_the_prefill_step(hd_model, slice_processor):
    inputs = slice_processor(images=[synthesize_image(700, 300)], text=PROMPT, return_tensors="pt")  # 1x2: 3 blocks
    with record_forward_inputs(hd_model) as calls, torch.no_grad():
        hd_model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert [sorted({"pixel_values", "image_grids"} & set(call)) for call in calls] == [
        ["image_grids", "pixel_values"], [], []]
    assert calls[0]["image_grids"].tolist() == [[1, 2]]


HD_IMAGES = [(700, 300), (300, 700), (300, 300)]  # grids 1x2, 2x1, 1x1: 3 + 3 + 1 blocks (tiny tower ~0.2 s/block)


def test_batched_hd_generation_equals_each_image_alone(hd_model, slice_processor):
    images = [synthesize_image(*size) for size in HD_IMAGES]
    batch = slice_processor(images=images, text=[PROMPT] * len(images), return_tensors="pt")
    assert batch["image_grids"].tolist() == [[1, 2], [2, 1], [1, 1]]
    width = batch["input_ids"].shape[1]
    options = {"max_new_tokens": 6, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    with torch.inference_mode():
        batched = hd_model.generate(**batch, **options)
        answers = []
        for index, image in enumerate(images):
            single = slice_processor(images=[image], text=[PROMPT], return_tensors="pt")
            alone = hd_model.generate(**single, **options)
            tokens = alone.sequences[0, single["input_ids"].shape[1]:].tolist()
            assert batched.sequences[index, width:].tolist() == tokens, HD_IMAGES[index]
            first_step = float((batched.logits[0][index] - alone.logits[0][0]).abs().max())
            assert first_step <= 1e-4, (HD_IMAGES[index], first_step)
            answers.append(tuple(tokens))
    assert len(set(answers)) > 1  # the images matter to this random model


def test_beams_and_several_sequences_keep_each_prompts_blocks(hd_model, slice_processor):
    """generate repeats each prompt for num_beams/num_return_sequences: the model repeats that prompt's blocks (and
    grids) with it instead of repeating every block in place."""
    images = [synthesize_image(*size) for size in (HD_IMAGES[0], HD_IMAGES[2])]
    batch = slice_processor(images=images, text=[PROMPT] * 2, return_tensors="pt")
    options = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}
    with torch.inference_mode():
        generated = hd_model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
        for index, image in enumerate(images):
            single = slice_processor(images=[image], text=[PROMPT], return_tensors="pt")
            alone = hd_model.generate(**single, **options)[:, single["input_ids"].shape[1]:]
            assert generated[2 * index:2 * index + 2].tolist() == alone.tolist()


# ----------------------------------------------------------------------------------------------------------------
# Extreme sizes and memory


@pytest.mark.parametrize("size_wh, grid", [((1, 1), (1, 1)), ((1, 4000), (9, 1)), ((4000, 1), (1, 9))])
def test_extreme_aspect_ratios_give_valid_blocks(size_wh, grid):
    """The original asks F.interpolate for a 0-pixel side on such images (and fails); a side is at least 1 px."""
    colour = (250, 10, 128)
    out = TokenPackerImageProcessor(image_aspect_ratio="slice")(Image.new("RGB", size_wh, colour), return_tensors="pt")
    pixels = out["pixel_values"]
    assert out["image_grids"].tolist() == [list(grid)]
    assert pixels.shape == (grid[0] * grid[1] + int(grid != (1, 1)), 3, BLOCK, BLOCK)
    assert bool(torch.isfinite(pixels).all())
    value = (torch.tensor(colour, dtype=torch.float32) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    filled = (pixels != 0).any(1)  # [blocks, H, W]
    if size_wh == (1, 1):
        assert float((pixels[0] - value[:, None, None]).abs().max()) <= 1e-6  # one colour everywhere
        return
    blocks = filled[:-1]
    if size_wh == (1, 4000):  # a one-pixel column down every block
        assert blocks[:, :, 0].all() and not blocks[:, :, 1:].any()
    else:  # a one-pixel row along every block
        assert blocks[:, 0, :].all() and not blocks[:, 1:, :].any()
    nonzero = pixels[:-1].permute(1, 0, 2, 3)[:, blocks]
    assert float((nonzero - value[:, None]).abs().max()) <= 1e-6
    # The global view squeezes the padded 3024-px canvas into 1 x 336 px: its one line samples the canvas's middle
    # (source position 167.5 of 336), which is padding: the view is empty, as the original's formula makes it.
    assert not filled[-1].any()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource
    from PIL import Image, ImageDraw
    from modeling_tokenpacker import TokenPackerImageProcessor

    def status_mb(key):  # VmRSS (now) or VmHWM (peak) of this process, Linux
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith(key + ":")) / 1024

    def reset_peak():  # Linux >= 4.0: VmHWM := VmRSS; else fall back to getrusage's lifetime peak
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    bomb_limit = Image.MAX_IMAGE_PIXELS
    processor = TokenPackerImageProcessor(image_aspect_ratio="slice", patch_num=9)
    processor(Image.new("RGB", (700, 500)))  # warm up every code path at a small size
    before_image = status_mb("VmRSS")
    image = Image.new("RGB", (10000, 10000), (20, 180, 60))
    ImageDraw.Draw(image).ellipse((2500, 2500, 6000, 7000), fill=(240, 20, 20))
    with_image = status_mb("VmRSS")
    exact = reset_peak()
    out = processor(image, return_tensors="np")
    peak = status_mb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"image_mb": with_image - before_image, "processing_mb": peak - with_image, "exact_peak": exact,
                      "grid": out["image_grids"].tolist(), "shape": list(out["pixel_values"].shape),
                      "finite": bool(abs(out["pixel_values"]).max() < 10),
                      "bomb_limit_unchanged": Image.MAX_IMAGE_PIXELS == bomb_limit and bomb_limit is not None}))
""")


def test_ten_thousand_squared_image_stays_within_a_bounded_memory():
    """A 10000x10000 RGB image (300 MB decoded): slicing it adds well under 300 MB to the peak resident memory of a
    fresh process (measured from the image's own footprint), since source rows are read in strips and only the pixels
    the bilinear resize reads are converted to float; PIL's decompression-bomb limit is left alone."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"[hd memory] 10000x10000: image {report['image_mb']:.0f} MB, "
          f"processing peak +{report['processing_mb']:.0f} MB "
          f"({'VmHWM after a reset' if report['exact_peak'] else 'getrusage lifetime peak'})")
    assert report["grid"] == [[3, 3]] and report["shape"] == [10, 3, BLOCK, BLOCK] and report["finite"]
    assert report["image_mb"] > 250  # the image really was in memory
    assert report["processing_mb"] < 300
    assert report["bomb_limit_unchanged"]


# ----------------------------------------------------------------------------------------------------------------
# Remote code, transformers 5.x and 4.46


@pytest.fixture(scope="module")
def hd_checkpoint(tmp_path_factory, hd_model, slice_processor):
    folder = tmp_path_factory.mktemp("hd_remote")
    checkpoint = folder / "tiny_hd_ckpt"
    hd_model.save_pretrained(checkpoint)
    slice_processor.save_pretrained(checkpoint)
    paths = []
    for index, size in enumerate(HD_IMAGES[:2]):
        paths.append(folder / f"image{index}.png")
        synthesize_image(*size).save(paths[-1])
    return checkpoint, paths


def _expected_remote_tokens(hd_model, slice_processor, image_paths):
    from test_remote_code import PROMPTS

    inputs = slice_processor(images=[Image.open(p) for p in image_paths], text=PROMPTS, return_tensors="pt")
    with torch.inference_mode():
        out = hd_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_hd_checkpoint_generates_as_remote_code_without_the_package(hd_checkpoint, hd_model, slice_processor):
    from test_remote_code import run_child

    checkpoint, image_paths = hd_checkpoint
    report = run_child(checkpoint, image_paths, cwd=checkpoint.parent)
    assert not report["imported_package"]
    assert report["tokens"] == _expected_remote_tokens(hd_model, slice_processor, image_paths)


def test_hd_checkpoint_generates_identically_under_transformers_4_46(hd_checkpoint, hd_model, slice_processor,
                                                                     legacy_python):
    from test_remote_code import run_child

    checkpoint, image_paths = hd_checkpoint
    report = run_child(checkpoint, image_paths, cwd=checkpoint.parent, python=legacy_python)
    assert report["tokens"] == _expected_remote_tokens(hd_model, slice_processor, image_paths)


def test_token_budget_benchmark_writes_its_table(tmp_path):
    import importlib.util

    path = os.path.join(REPO, "benchmarks", "token_budget.py")
    spec = importlib.util.spec_from_file_location("benchmark_token_budget", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows, averages, _ = module.run(str(tmp_path), plot=False)
    assert len(rows) == 6 * 3 * 3 and len(averages) == 9
    assert (tmp_path / "token_budget.csv").is_file() and (tmp_path / "token_budget_averages.csv").is_file()
    for row in rows:
        assert row["visual_tokens"] == visual_positions(row["rows"], row["cols"], row["tokens_per_block"])
        assert (row["rows"], row["cols"]) == reference_grids([row["height"]], [row["width"]], row["patch_num"])[0]

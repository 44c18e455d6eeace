"""TokenPackerProcessor: the original's `tokenizer_image_token` ids with each placeholder expanded, count checks,
padding, the vicuna_v1 chat template, decoding, save/load, and a property test on token counts."""

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.exceptions import TemplateError
from PIL import Image

from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor, load_chat_template
from modeling_tokenpacker.demo import synthesize_image

ORIGINAL_IMAGE_PLACEHOLDER = -200  # the original's IMAGE_TOKEN_INDEX
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
QUESTION = "What is in the image?"
VICUNA_PROMPT = f"{VICUNA_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT:"


@pytest.fixture(scope="module")
def small_image():
    return synthesize_image(12, 9)


def original_tokenizer_image_token(tokenizer, prompt):
    """The original's algorithm, from its description: every `<image>`-separated chunk tokenized on its own (each
    with its BOS); when the first chunk starts with BOS, one BOS leads and the first token of every chunk is dropped;
    a placeholder between consecutive chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    input_ids = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for index, chunk in enumerate(chunks):
        if index > 0:
            input_ids.append(ORIGINAL_IMAGE_PLACEHOLDER)
        input_ids.extend(chunk[offset:])
    return input_ids


def expand_placeholders(ids, image_token_id, image_seq_length):
    expanded = []
    for token in ids:
        expanded.extend([image_token_id] * image_seq_length if token == ORIGINAL_IMAGE_PLACEHOLDER else [token])
    return expanded


def reference_ids(processor, prompt):
    original = original_tokenizer_image_token(processor.tokenizer, prompt)
    return expand_placeholders(original, processor.image_token_id, processor.image_seq_length)


def image_runs(ids, image_token_id):
    """(start, length) of every maximal run of `image_token_id`."""
    runs, start = [], None
    for position, token in enumerate(list(ids) + [None]):
        if token == image_token_id and start is None:
            start = position
        elif token != image_token_id and start is not None:
            runs.append((start, position - start))
            start = None
    return runs


def build_tokenizer(prepend_scheme="always", with_image_token=True):
    """A tiny BPE tokenizer like the demo's; `prepend_scheme="first"` makes chunk-wise tokenization differ from
    tokenizing the whole prompt (as with SentencePiece), `with_image_token=False` leaves `<image>` out."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    backend.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme),
                                         decoders.ByteFallback()])
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
                                  show_progress=False)
    backend.train_from_iterator([VICUNA_PROMPT + " a cat and a dog"] * 4, trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    extra = {"additional_special_tokens": ["<image>"]} if with_image_token else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="left", **extra)


PROMPTS = [
    pytest.param("<image>\nWhat is in the image?", 1, id="image-first"),
    pytest.param("USER: <image>\nDescribe the image briefly. ASSISTANT:", 1, id="image-middle"),
    pytest.param("Describe this picture: <image>", 1, id="image-last"),
    pytest.param("<image>", 1, id="image-only"),
    pytest.param("<image>a cat", 1, id="no-text-before-no-space-after"),
    pytest.param("a cat <image> and a dog <image> in a house", 2, id="two-images-middle"),
    pytest.param("USER: <image>\n<image>\nCompare the images. ASSISTANT:", 2, id="two-images-adjacent"),
    pytest.param("<image><image><image>", 3, id="three-images-no-text"),
    pytest.param(VICUNA_PROMPT, 1, id="vicuna-v1-full"),
    pytest.param("no image here, just text", 0, id="text-only"),
]


# ----------------------------------------------------------------------------------------------------------------
# Placeholder expansion and the original's token ids


def test_image_seq_length_and_token_id_come_from_the_tokenizer(processor, tokenizer, tiny_model):
    assert processor.image_seq_length == tiny_model.config.image_seq_length == 144
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == tiny_model.config.image_token_id


def test_each_placeholder_becomes_one_contiguous_run_at_the_right_place(processor, small_image):
    prefix, suffix = f"{VICUNA_SYSTEM} USER: ", f"\n{QUESTION} ASSISTANT:"
    ids = processor(text=prefix + "<image>" + suffix, images=small_image)["input_ids"][0]
    prefix_ids = processor.tokenizer(prefix).input_ids
    suffix_ids = processor.tokenizer(suffix).input_ids[1:]  # without its BOS
    assert image_runs(ids, processor.image_token_id) == [(len(prefix_ids), processor.image_seq_length)]
    assert ids[: len(prefix_ids)] == prefix_ids
    assert ids[len(prefix_ids) + processor.image_seq_length :] == suffix_ids
    assert ids.count(processor.tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("prompt, num_images", PROMPTS)
def test_input_ids_equal_original_tokenizer_image_token_with_placeholders_expanded(processor, small_image, prompt,
                                                                                   num_images):
    images = [small_image] * num_images or None
    output = processor(text=prompt, images=images)
    expected = reference_ids(processor, prompt)
    assert output["input_ids"] == [expected]
    assert output["attention_mask"] == [[1] * len(expected)]
    runs = image_runs(output["input_ids"][0], processor.image_token_id)
    if "<image><image>" not in prompt:  # adjacent placeholders with no text between them make one longer run
        assert [length for _, length in runs] == [processor.image_seq_length] * num_images
    assert output["input_ids"][0].count(processor.image_token_id) == processor.image_seq_length * num_images
    assert output["input_ids"][0][0] == processor.tokenizer.bos_token_id
    if num_images:
        assert output["pixel_values"].shape == (num_images, 3, 336, 336)
    else:
        assert "pixel_values" not in output


@pytest.mark.parametrize("prompt", ["USER: <image>\nWhat is in the image? ASSISTANT:", VICUNA_PROMPT,
                                    "a cat<image>and a dog<image>in a house"])
def test_chunks_are_tokenized_separately_like_the_original(prompt, small_image):
    """With a tokenizer that marks only the text's first word (SentencePiece-like), tokenizing chunk by chunk gives
    other boundary tokens than tokenizing the whole prompt; the processor must follow the original (chunk-wise)."""
    tokenizer = build_tokenizer(prepend_scheme="first")
    processor = TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer, image_seq_length=5)
    num_images = prompt.count("<image>")
    ids = processor(text=prompt, images=[small_image] * num_images)["input_ids"][0]
    assert ids == reference_ids(processor, prompt)
    whole = tokenizer(prompt.replace("<image>", "<image>" * 5)).input_ids
    assert ids != whole  # the check above is able to tell the two tokenizations apart


@pytest.mark.parametrize("image_seq_length", [36, 64, 1])
def test_other_image_seq_lengths_expand_each_placeholder_to_that_many_tokens(tokenizer, small_image,
                                                                             image_seq_length):
    processor = TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer, image_seq_length=image_seq_length)
    prompt = "a cat <image> and a dog <image> in a house"
    ids = processor(text=prompt, images=[small_image, small_image])["input_ids"][0]
    assert ids == reference_ids(processor, prompt)
    assert [length for _, length in image_runs(ids, processor.image_token_id)] == [image_seq_length] * 2


@pytest.mark.parametrize("bad", [0, -3])
def test_non_positive_image_seq_length_raises(tokenizer, bad):
    with pytest.raises(ValueError, match=str(bad)):
        TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer, image_seq_length=bad)


# ----------------------------------------------------------------------------------------------------------------
# Count mismatches


@pytest.mark.parametrize(
    "text, num_images, num_placeholders",
    [
        pytest.param("USER: <image>\nWhat? ASSISTANT:", 3, 1, id="more-images"),
        pytest.param("<image> <image> <image> <image>", 2, 4, id="fewer-images"),
        pytest.param("USER: <image>\nWhat? ASSISTANT:", None, 1, id="images-none"),
        pytest.param("no placeholder here", 2, 0, id="no-placeholder"),
        pytest.param(["<image> a", "<image> <image> b", "c <image>"], 5, 4, id="batch-total"),
    ],
)
def test_placeholder_image_count_mismatch_raises_with_both_numbers(processor, small_image, text, num_images,
                                                                   num_placeholders):
    images = None if num_images is None else [small_image] * num_images
    with pytest.raises(ValueError) as error:
        processor(text=text, images=images)
    message = str(error.value)
    assert f"{num_placeholders} <image> placeholders" in message
    assert f"{num_images or 0} images" in message


def test_images_without_text_give_pixel_values_only(processor, small_image):
    out = processor(images=[small_image, small_image], return_tensors="pt")
    assert set(out) == {"pixel_values"} and out["pixel_values"].shape == (2, 3, 336, 336)
    with pytest.raises(ValueError, match="needs text, images or both"):
        processor()


# ----------------------------------------------------------------------------------------------------------------
# Batches and padding


BATCH = [
    "USER: <image>\nWhat is in the image? ASSISTANT:",
    "<image> a cat",
    "a cat and a dog and a house <image> <image>",
]


def test_batch_is_left_padded_by_default_with_one_pixel_row_per_image(processor, images):
    output = processor(text=BATCH, images=images + [images[0]], return_tensors="pt")
    input_ids, attention_mask = output["input_ids"], output["attention_mask"]
    assert input_ids.dtype == torch.long and input_ids.shape == attention_mask.shape
    expected = [reference_ids(processor, prompt) for prompt in BATCH]
    longest = max(len(ids) for ids in expected)
    assert input_ids.shape == (len(BATCH), longest)
    pad_id = processor.tokenizer.pad_token_id
    for row, ids in enumerate(expected):
        pad = longest - len(ids)
        assert input_ids[row].tolist() == [pad_id] * pad + ids
        assert attention_mask[row].tolist() == [0] * pad + [1] * len(ids)
    assert (attention_mask == 0).any()  # the batch really needed padding
    pixel_values = output["pixel_values"]
    assert pixel_values.shape == (4, 3, 336, 336)
    expected_pixels = processor.image_processor(images + [images[0]], return_tensors="pt")["pixel_values"]
    assert torch.equal(pixel_values, expected_pixels)


def test_padding_side_right_pads_on_the_right_and_leaves_tokenizer_unchanged(processor, images):
    side_before = processor.tokenizer.padding_side
    output = processor(text=BATCH, images=images + [images[0]], padding_side="right", return_tensors="pt")
    assert processor.tokenizer.padding_side == side_before == "left"
    expected = [reference_ids(processor, prompt) for prompt in BATCH]
    longest = max(len(ids) for ids in expected)
    pad_id = processor.tokenizer.pad_token_id
    for row, ids in enumerate(expected):
        pad = longest - len(ids)
        assert output["input_ids"][row].tolist() == ids + [pad_id] * pad
        assert output["attention_mask"][row].tolist() == [1] * len(ids) + [0] * pad


def test_unpadded_batch_of_different_lengths_cannot_become_a_tensor(processor, images):
    with pytest.raises(ValueError, match="padding"):
        processor(text=BATCH, images=images + [images[0]], padding=False, return_tensors="pt")
    as_lists = processor(text=BATCH, images=images + [images[0]], padding=False)
    assert as_lists["input_ids"] == [reference_ids(processor, prompt) for prompt in BATCH]


# ----------------------------------------------------------------------------------------------------------------
# Chat template (vicuna_v1)


def test_chat_template_single_turn_is_the_original_vicuna_v1_prompt(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    # The BOS text and a space lead (vLLM tokenizes rendered chats without special tokens; the space stands
    # for the word prefix SentencePiece writes at the start of a text only); the processor adds no second BOS.
    assert rendered == "<s> " + VICUNA_PROMPT
    image = Image.new("RGB", (32, 24))
    assert processor(text=rendered, images=image)["input_ids"] == processor(text=VICUNA_PROMPT, images=image)["input_ids"]
    written = processor(text=rendered, images=image, add_special_tokens=False)["input_ids"][0]
    assert written[0] == processor.tokenizer.bos_token_id and written.count(processor.tokenizer.bos_token_id) == 1


def test_chat_template_multi_turn_uses_space_after_user_and_eos_after_assistant(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A1"}]},
        {"role": "user", "content": [{"type": "text", "text": "Q2"}]},
    ]
    expected = f"<s> {VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected
    # Without the generation prompt a conversation ending on an assistant turn ends with its '</s>'.
    closed = processor.apply_chat_template(messages[:2], add_generation_prompt=False)
    assert closed == f"<s> {VICUNA_SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>"


def test_chat_template_system_message_replaces_default_system_text(processor):
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You answer in one word."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == f"<s> You answer in one word. USER: <image>\n{QUESTION} ASSISTANT:"
    assert VICUNA_SYSTEM not in text


def test_chat_template_accepts_string_content(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nQ1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<s> Be brief. USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:"


def test_chat_template_unknown_role_raises(processor):
    with pytest.raises(TemplateError, match="narrator"):
        processor.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


def test_chat_template_output_feeds_the_processor(processor, small_image):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    ids = processor(text=text, images=small_image)["input_ids"][0]
    assert ids == reference_ids(processor, VICUNA_PROMPT)


# ----------------------------------------------------------------------------------------------------------------
# Decoding


def test_decode_and_batch_decode_delegate_to_the_tokenizer(processor, small_image):
    output = processor(text=["USER: <image>\nWhat? ASSISTANT:", "a cat"], images=small_image, return_tensors="pt")
    ids = output["input_ids"]
    for skip in (True, False):
        assert processor.batch_decode(ids, skip_special_tokens=skip) == processor.tokenizer.batch_decode(
            ids, skip_special_tokens=skip
        )
        assert processor.decode(ids[0], skip_special_tokens=skip) == processor.tokenizer.decode(
            ids[0], skip_special_tokens=skip
        )
    with_special = processor.batch_decode(ids, skip_special_tokens=False)
    assert with_special[0].count("<image>") == processor.image_seq_length
    assert "<pad>" in with_special[1]
    skipped = processor.batch_decode(ids, skip_special_tokens=True)
    assert all("<image>" not in text and "<pad>" not in text and "<s>" not in text for text in skipped)
    assert "What?" in skipped[0] and "a cat" in skipped[1]


# ----------------------------------------------------------------------------------------------------------------
# Save / load


def test_save_load_round_trip_keeps_settings_and_input_ids(tmp_path, tokenizer, images):
    original = TokenPackerProcessor(
        TokenPackerImageProcessor(image_aspect_ratio="square"), tokenizer, image_seq_length=64,
        chat_template=load_chat_template("vicuna_v1"),
    )
    original.save_pretrained(tmp_path)
    assert (tmp_path / "preprocessor_config.json").is_file()
    saved_image_config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved_image_config["image_aspect_ratio"] == "square"

    loaded = TokenPackerProcessor.from_pretrained(tmp_path)
    assert type(loaded) is TokenPackerProcessor
    assert isinstance(loaded.image_processor, TokenPackerImageProcessor)
    assert loaded.image_seq_length == 64
    assert loaded.image_token == original.image_token == "<image>"
    assert loaded.image_token_id == original.image_token_id
    assert loaded.chat_template == original.chat_template == load_chat_template("vicuna_v1")
    assert loaded.image_processor.to_dict() == original.image_processor.to_dict()
    assert loaded.tokenizer.padding_side == tokenizer.padding_side

    text = ["USER: <image>\nWhat is in the image? ASSISTANT:", "a cat <image> and a dog <image>"]
    before = original(text=text, images=images, return_tensors="pt")
    after = loaded(text=text, images=images, return_tensors="pt")
    assert torch.equal(after["input_ids"], before["input_ids"])
    assert torch.equal(after["attention_mask"], before["attention_mask"])
    assert torch.equal(after["pixel_values"], before["pixel_values"])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == "<s> " + VICUNA_PROMPT


def test_custom_image_token_survives_save_load(tmp_path, small_image):
    tokenizer = build_tokenizer(with_image_token=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<img>"]})
    original = TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer, image_seq_length=3, image_token="<img>")
    original.save_pretrained(tmp_path)
    loaded = TokenPackerProcessor.from_pretrained(tmp_path)
    assert loaded.image_token == "<img>"
    ids = loaded(text="a cat <img> b", images=small_image)["input_ids"][0]
    assert ids == original(text="a cat <img> b", images=small_image)["input_ids"][0]
    assert ids.count(loaded.tokenizer.convert_tokens_to_ids("<img>")) == 3


# ----------------------------------------------------------------------------------------------------------------
# A tokenizer without the image token


def test_tokenizer_without_image_token_raises_at_construction_telling_how_to_add_it():
    tokenizer = build_tokenizer(with_image_token=False)
    assert "<image>" not in tokenizer.get_vocab()
    with pytest.raises(ValueError) as error:
        TokenPackerProcessor(TokenPackerImageProcessor(), tokenizer)
    message = str(error.value)
    assert "<image>" in message
    assert "add_special_tokens" in message and "additional_special_tokens" in message


def test_system_message_after_the_first_raises(processor):
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "SYS"}]
    with pytest.raises(Exception, match="system message only as the first message"):
        processor.apply_chat_template(messages)


# ----------------------------------------------------------------------------------------------------------------
# Property test: token counts

WORDS = ["a", "cat", "dog", "USER:", "ASSISTANT:", "the", "image", "?", ",", "\n", "house", "zebra", "7", "é", "🙂"]


@st.composite
def prompts_with_images(draw):
    words = draw(st.lists(st.sampled_from(WORDS), max_size=12))
    num_images = draw(st.integers(0, 3))
    for _ in range(num_images):
        words.insert(draw(st.integers(0, len(words))), "<image>")
    separator = draw(st.sampled_from([" ", "", "\n"]))
    return separator.join(words), num_images


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(prompts_with_images(), min_size=1, max_size=3))
def test_property_image_token_count_and_attention_mask_match_the_prompts(processor, batch):
    image = Image.new("RGB", (4, 3), (10, 200, 30))
    texts = [text for text, _ in batch]
    total_images = sum(count for _, count in batch)
    output = processor(text=texts, images=[image] * total_images or None)
    for (text, num_images), ids, mask in zip(batch, output["input_ids"], output["attention_mask"]):
        expected = reference_ids(processor, text)
        assert ids.count(processor.image_token_id) == num_images * processor.image_seq_length
        assert sum(mask) == len(expected)
        assert [token for token, keep in zip(ids, mask) if keep] == expected
    assert len({len(ids) for ids in output["input_ids"]}) == 1
    if total_images:
        assert output["pixel_values"].shape == (total_images, 3, 336, 336)

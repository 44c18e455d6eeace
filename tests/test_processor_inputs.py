"""The processor as transformers users call native LlavaProcessor: images from paths and URLs in prompts, chat
messages and pipelines; the tokenizer's own arguments (truncation, padding, special tokens, offsets, assistant
masks); images alone; bad text, messages and image nesting refused clearly; no shared state changed by a call."""

import http.server
import threading

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image

from modeling_tokenpacker.demo import synthesize_image

PROMPT = "USER: <image>\nWhat is in the image? ASSISTANT:"
NEWEST = Version(transformers.__version__)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("processor_images") / "picture.png"
    synthesize_image(64, 48).save(path)
    return path


@pytest.fixture(scope="module")
def image_url(image_file):
    folder = str(image_file.parent)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=folder, **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{image_file.name}"
    server.shutdown()


def chat(image_block):
    return [{"role": "user", "content": [image_block, {"type": "text", "text": "What is in the image?"}]}]


def test_a_path_as_image_equals_the_opened_image(processor, image_file):
    by_path = processor(images=str(image_file), text=PROMPT, return_tensors="pt")
    by_image = processor(images=Image.open(image_file), text=PROMPT, return_tensors="pt")
    torch.testing.assert_close(by_path["pixel_values"], by_image["pixel_values"])
    assert by_path["input_ids"].tolist() == by_image["input_ids"].tolist()


@pytest.mark.skipif(NEWEST < Version("5.0"), reason="chat content with paths/urls needs transformers 5's processor")
@pytest.mark.parametrize("key", ["path", "url", "image"])
def test_chat_messages_with_paths_and_urls_load_the_image(processor, image_file, image_url, key):
    value = {"path": str(image_file), "url": image_url, "image": str(image_file)}[key]
    out = processor.apply_chat_template(chat({"type": "image", key: value}), add_generation_prompt=True,
                                        tokenize=True, return_dict=True, return_tensors="pt")
    expected = processor(images=Image.open(image_file), text=processor.apply_chat_template(
        chat({"type": "image"}), add_generation_prompt=True), return_tensors="pt")
    assert out["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(out["pixel_values"], expected["pixel_values"])


@pytest.mark.skipif(NEWEST < Version("5.0"), reason="chat content with paths needs transformers 5's pipeline")
def test_the_pipeline_loads_an_image_path_from_chat_messages(checkpoint, image_file):
    pipe = transformers.pipeline("image-text-to-text", model=str(checkpoint), trust_remote_code=True)
    out = pipe(text=chat({"type": "image", "path": str(image_file)}), max_new_tokens=3, return_full_text=False)
    assert isinstance(out[0]["generated_text"], str)


@pytest.mark.skipif(NEWEST < Version("5.0"), reason="assistant masks of processors need transformers 5")
def test_assistant_token_masks_mark_the_replies_and_their_end_of_turn(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
                {"role": "user", "content": [{"type": "text", "text": "And?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A gradient."}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        images=[synthesize_image(40, 30)])
    ids, mask = out["input_ids"][0], out["assistant_masks"][0]
    assert len(mask) == len(ids)
    marked = processor.tokenizer.decode([token for token, keep in zip(ids, mask) if keep])
    assert marked.replace(" ", "") == "Ared circle.</s>Agradient.</s>".replace(" ", "")
    assert not any(keep for token, keep in zip(ids, mask) if token == processor.image_token_id)
    # the markers change nothing of the text
    plain = processor.apply_chat_template(messages)
    assert "{% generation %}" not in plain and plain.endswith("A gradient.</s>")


def test_truncation_that_would_cut_image_tokens_is_refused_and_text_is_truncated_otherwise(processor):
    image = synthesize_image(40, 30)
    full = len(processor(images=image, text=PROMPT + " " + "cat " * 20)["input_ids"][0])
    with pytest.raises(ValueError, match="max_length=50 tokens would cut through its image tokens"):
        processor(images=image, text=PROMPT, truncation=True, max_length=50)
    cut = processor(images=image, text=PROMPT + " " + "cat " * 20, truncation=True, max_length=full - 5)
    assert len(cut["input_ids"][0]) == full - 5
    assert cut["input_ids"][0].count(processor.image_token_id) == processor.image_seq_length


@pytest.mark.parametrize("padding, max_length, multiple, expected", [
    ("max_length", 300, None, 300), (True, None, 64, 192), ("longest", None, None, None), (False, None, None, None)])
def test_every_form_of_padding(processor, padding, max_length, multiple, expected):
    image = synthesize_image(40, 30)
    texts = [PROMPT, PROMPT + " Be brief, please, and tell me more."]
    out = processor(images=[image, image], text=texts, padding=padding, max_length=max_length,
                    pad_to_multiple_of=multiple)
    lengths = [len(ids) for ids in out["input_ids"]]
    if expected is not None:
        assert lengths == [expected, expected]
    elif padding is False:
        assert lengths[0] < lengths[1]
    else:
        assert lengths[0] == lengths[1] and sum(out["attention_mask"][0]) < lengths[0]


def test_padding_side_per_call_leaves_the_tokenizer_alone_across_threads(processor):
    image = synthesize_image(40, 30)
    texts = [PROMPT, PROMPT + " Be brief, please."]
    side = processor.tokenizer.padding_side
    errors = []

    def work(wanted):
        for _ in range(25):
            ids = processor(images=[image, image], text=texts, padding_side=wanted)["input_ids"][0]
            pad = processor.tokenizer.pad_token_id
            if (ids[0] == pad) != (wanted == "left") or (ids[-1] == pad) != (wanted == "right"):
                errors.append(wanted)

    threads = [threading.Thread(target=work, args=(wanted,)) for wanted in ("left", "right", "left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and processor.tokenizer.padding_side == side


def test_add_special_tokens_false_drops_the_bos_only(processor):
    image = synthesize_image(40, 30)
    with_bos = processor(images=image, text=PROMPT)["input_ids"][0]
    without = processor(images=image, text=PROMPT, add_special_tokens=False)["input_ids"][0]
    assert with_bos[0] == processor.tokenizer.bos_token_id and without == with_bos[1:]


def test_offsets_and_replacement_offsets_describe_the_expanded_prompt(processor):
    out = processor(images=synthesize_image(40, 30), text=PROMPT, return_offsets_mapping=True,
                    return_text_replacement_offsets=True)
    (entry,) = out["text_replacement_offsets"][0]
    assert entry["type"] == "image" and entry["span"] == (6, 13) and entry["text"] == "<image>"
    expanded = PROMPT.replace("<image>", entry["replacement"], 1)
    ids, offsets = out["input_ids"][0], out["offset_mapping"][0]
    image_offsets = [pair for token, pair in zip(ids, offsets) if token == processor.image_token_id]
    assert image_offsets[0][0] == 6 and image_offsets[-1][1] == entry["new_span"][1]
    text_after = [expanded[a:b] for token, (a, b) in zip(ids, offsets)
                  if token != processor.image_token_id and a >= entry["new_span"][1]]
    assert "".join(text_after).replace("▁", " ").strip().startswith("What")


@pytest.mark.parametrize("text, error, message", [
    ([], ValueError, "empty list"), (123, TypeError, "got int"), ({"text": PROMPT}, TypeError, "got dict"),
    ([PROMPT, 7], TypeError, "items 1: int"), (b"USER: hi", TypeError, "got bytes")])
def test_text_that_is_not_prompts_is_refused(processor, text, error, message):
    with pytest.raises(error, match=message):
        processor(images=synthesize_image(40, 30), text=text)


def test_an_image_passed_as_text_is_refused(processor):
    with pytest.raises(TypeError, match="got Image"):
        processor(text=synthesize_image(40, 30))


def test_nested_images_must_match_each_prompts_placeholders(processor):
    image = synthesize_image(40, 30)
    prompts = [PROMPT, "USER: <image>\n<image>\nCompare. ASSISTANT:"]
    nested = processor(images=[[image], [image, image]], text=prompts)
    flat = processor(images=[image, image, image], text=prompts)
    assert nested["input_ids"] == flat["input_ids"]
    with pytest.raises(ValueError, match=r"\[2, 1\] images for 2 prompts.*\[1, 2\] <image> placeholders"):
        processor(images=[[image, image], [image]], text=prompts)


def test_empty_messages_are_refused(processor):
    with pytest.raises(ValueError, match="non-empty list of messages"):
        processor.apply_chat_template([], add_generation_prompt=True)
    with pytest.raises(ValueError, match="'role'"):
        processor.apply_chat_template([{"text": "hi"}])


def test_return_tensors_numpy_and_none(processor):
    image = synthesize_image(40, 30)
    assert isinstance(processor(images=image, text=PROMPT, return_tensors="np")["input_ids"], np.ndarray)
    assert isinstance(processor(images=image, text=PROMPT)["input_ids"], list)

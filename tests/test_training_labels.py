"""Training labels equal the original's (tests/fixtures/labels.json, made by running its preprocessing functions:
tests/fixtures/make_label_fixtures.py), after the image placeholder is expanded to the processor's image ids."""

import json
import os

import pytest

from modeling_tokenpacker.training.labels import (IGNORE_INDEX, IMAGE_PLACEHOLDER, LabelBuilder, SampleError,
                                                  vicuna_v1_prompt)
from llama_processor import make_processor, sentencepiece_tokenizer

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "labels.json")))
MAX_LENGTH = FIXTURE["provenance"]["model_max_length"]
CASES = {case["name"]: case for case in FIXTURE["cases"]}


@pytest.fixture(scope="module", params=["pad", "slice"])
def processor(request):
    return make_processor(sentencepiece_tokenizer(), request.param, image_seq_length=16)


def expanded(processor, ids, labels, grid=None):
    """The original's ids and labels with its placeholder replaced by the processor's ids for one image."""
    out_ids, out_labels = [], []
    for token, label in zip(ids, labels):
        if token == IMAGE_PLACEHOLDER:
            run = processor.image_placeholder_ids(grid)
            out_ids += run
            out_labels += [IGNORE_INDEX] * len(run)
        else:
            out_ids.append(token)
            out_labels.append(label)
    return out_ids[:MAX_LENGTH], out_labels[:MAX_LENGTH]


@pytest.mark.parametrize("name", sorted(CASES))
def test_ids_and_labels_equal_the_originals_after_expansion(processor, name):
    case = CASES[name]
    builder = LabelBuilder(processor, case["template"], model_max_length=MAX_LENGTH)
    turns = [(turn["from"], turn["value"]) for turn in case["conversations"]]
    grid = (2, 3) if processor.image_processor.image_aspect_ratio == "slice" and case["has_image"] else None
    ids, labels, mismatch = builder.build(turns, case["has_image"], name, image_grids=[grid] if grid else None)
    assert (ids, labels) == expanded(processor, case["input_ids"], case["labels"], grid)
    assert mismatch == (all(label == IGNORE_INDEX for label in case["labels"]) and case["template"] == "vicuna_v1")


def test_single_turn_supervises_exactly_the_reply_and_its_end_of_turn(processor):
    builder = LabelBuilder(processor, "vicuna_v1", model_max_length=512)
    ids, labels, mismatch = builder.build([("human", "<image>\nWhat is it?"), ("gpt", "A red car.")], True, "s1")
    supervised = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    tokenizer = processor.tokenizer
    assert not mismatch and supervised == [label for label in labels if label != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == "A red car.</s>"
    assert processor.image_token_id not in supervised


def test_the_prompt_is_the_original_vicuna_v1_text():
    assert vicuna_v1_prompt([("human", "Q1"), ("gpt", "A1"), ("human", "Q2"), ("gpt", "A2")]).endswith(
        "questions. USER: Q1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>")


@pytest.mark.parametrize("turns, has_image, message", [
    ([("human", "hi"), ("human", "again")], False, "alternate"),
    ([("human", "hi"), ("bot", "yes")], False, "roles must be"),
    ([("human", "<image>\nhi")], True, "needs a human turn"),
])
def test_malformed_conversations_are_refused_with_the_sample_id(processor, turns, has_image, message):
    with pytest.raises(SampleError, match=f"sample x7.*{message}"):
        LabelBuilder(processor).build(turns, has_image, "x7")


def test_plain_needs_an_image_and_a_caption(processor):
    with pytest.raises(SampleError, match="sample c1: the 'plain' template"):
        LabelBuilder(processor, "plain").build([("human", "no image"), ("gpt", "caption")], False, "c1")

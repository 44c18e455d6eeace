"""Training data: both formats read lazily, bad samples reported by id (skipped or raised), batches the model
trains on."""

import json
import logging

import pytest
import torch
from torch.utils.data import DataLoader

from llama_processor import make_processor, sentencepiece_tokenizer
from modeling_tokenpacker.demo import build_tiny_model, synthesize_image
from modeling_tokenpacker.training import (IGNORE_INDEX, ConversationDataset, ExampleBuilder, SampleError,
                                           StreamingConversationDataset, TokenPackerDataCollator)

REPLY = "A red car."


@pytest.fixture(scope="module")
def tokenizer():
    return sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    synthesize_image(480, 360).save(folder / "a.png")
    synthesize_image(300, 700).save(folder / "b.jpg")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def llava_row(sample_id, image="a.png", question="<image>\nWhat is in the image?", reply=REPLY):
    row = {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}
    if image is not None:
        row["image"] = image
    return row


def supervised_text(tokenizer, example):
    return tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_llava_json_and_jsonl_give_the_same_examples(tmp_path, tokenizer, image_folder, suffix):
    rows = [llava_row("s1"), llava_row("t1", image=None, question="Tell me a fact.")]
    path = tmp_path / f"data{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(row) for row in rows) + "\n")
    processor = make_processor(tokenizer, "pad")
    dataset = ConversationDataset(str(path), ExampleBuilder(processor, image_folder=str(image_folder)))
    first, text_only = dataset[0], dataset[1]
    assert first["pixel_values"].shape == (1, 3, 336, 336) and text_only["pixel_values"] is None
    assert first["input_ids"].count(processor.image_token_id) == processor.image_seq_length
    assert supervised_text(tokenizer, first) == REPLY + "</s>" == supervised_text(tokenizer, text_only)


def test_datasets_messages_and_images_rows_equal_the_llava_row(tokenizer, image_folder):
    from PIL import Image

    processor = make_processor(tokenizer, "slice")
    builder = ExampleBuilder(processor, image_folder=str(image_folder))
    image = Image.open(image_folder / "b.jpg")
    row = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
                        {"role": "assistant", "content": [{"type": "text", "text": REPLY}]}], "images": [image]}
    from_messages, from_llava = builder(row, 0), builder(llava_row("s1", image="b.jpg"), 0)
    assert from_messages["input_ids"] == from_llava["input_ids"] and from_messages["labels"] == from_llava["labels"]
    assert torch.equal(from_messages["pixel_values"], from_llava["pixel_values"])
    assert from_messages["image_grids"].tolist() == from_llava["image_grids"].tolist() != [[1, 1]]


@pytest.mark.parametrize("row, message", [
    (llava_row("m1", image="missing.png"), "sample m1: image file .*missing.png does not exist"),
    (llava_row("u1", image="broken.png"), "sample u1: the image cannot be read"),
    (llava_row("c1", image=["a.png", "b.jpg"]), r"sample c1: 1 <image> placeholder\(s\) but 2 image\(s\)"),
    (llava_row("c2", question="No placeholder here."), r"sample c2: 0 <image> placeholder\(s\) but 1 image"),
    ({"id": "k1", "text": "hello"}, "sample k1: expected 'conversations'"),
])
def test_bad_samples_raise_with_their_id(tokenizer, image_folder, row, message):
    builder = ExampleBuilder(make_processor(tokenizer, "pad"), image_folder=str(image_folder))
    with pytest.raises(SampleError, match=message):
        builder(row, 0)


def test_too_long_samples_are_cut_as_the_original_does_or_refused(tokenizer, image_folder):
    processor = make_processor(tokenizer, "pad")
    long_row = llava_row("l1", reply=" ".join(["The small dog is sitting near the window."] * 20))
    cut = ExampleBuilder(processor, image_folder=str(image_folder), model_max_length=64)(long_row, 0)
    assert len(cut["input_ids"]) == len(cut["labels"]) == 64
    with pytest.raises(SampleError, match="sample l1: .* more than model_max_length=64"):
        ExampleBuilder(processor, image_folder=str(image_folder), model_max_length=64, truncate=False)(long_row, 0)
    with pytest.raises(SampleError, match="sample l2: no label is left"):
        ExampleBuilder(processor, image_folder=str(image_folder), model_max_length=20)(llava_row("l2"), 0)


def test_skipped_samples_are_logged_and_replaced_by_the_next_good_one(tokenizer, image_folder, caplog):
    from transformers.utils import logging as hf_logging

    rows = [llava_row("good0"), llava_row("bad1", image="missing.png"), llava_row("good2", reply="Two dogs.")]
    builder = ExampleBuilder(make_processor(tokenizer, "pad"), image_folder=str(image_folder), on_bad_sample="skip")
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            dataset = ConversationDataset(rows, builder)
            assert supervised_text(tokenizer, dataset[1]) == "Two dogs.</s>"
            streamed = list(StreamingConversationDataset(iter(rows), builder))
    finally:
        hf_logging.disable_propagation()
    assert caplog.text.count("sample bad1") == 2 and len(streamed) == 2


def test_the_original_mismatch_masking_is_reported_not_trained_on(tokenizer, image_folder):
    """With a legacy=False LLaMA tokenizer the original masks every multi-turn sample (tests/fixtures/labels.json)."""
    row = llava_row("mt1")
    row["conversations"] += [{"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": "On the road."}]
    builder = ExampleBuilder(make_processor(tokenizer, "pad"), image_folder=str(image_folder))
    with pytest.raises(SampleError, match="sample mt1: .*tokenization mismatch"):
        builder(row, 0)


@pytest.mark.parametrize("mode", ["pad", "slice"])
def test_batches_from_a_dataloader_train_the_model(tokenizer, image_folder, mode):
    processor = make_processor(tokenizer, mode, image_seq_length=144)
    rows = [llava_row("a"), llava_row("t", image=None, question="Tell me a fact."), llava_row("b", image="b.jpg")]
    dataset = ConversationDataset(rows, ExampleBuilder(processor, image_folder=str(image_folder)))
    collator = TokenPackerDataCollator.from_processor(processor, pad_to_multiple_of=8)
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collator, num_workers=1)))
    lengths = [len(dataset[i]["input_ids"]) for i in range(3)]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["attention_mask"].sum(1).tolist() == lengths
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == sum(dataset[i]["pixel_values"].shape[0] for i in (0, 2))
    assert ("image_grids" in batch) == (mode == "slice")
    model = build_tiny_model(tokenizer)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.multi_modal_projector.parameters().__next__().grad is not None


def test_left_padding_puts_the_pads_first(tokenizer):
    collator = TokenPackerDataCollator(tokenizer.pad_token_id, padding_side="left")
    batch = collator([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tokenizer.pad_token_id] * 2 + [8]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]] and "pixel_values" not in batch


def test_datasets_image_bytes_are_decoded_and_broken_bytes_named(tokenizer, image_folder):
    builder = ExampleBuilder(make_processor(tokenizer, "pad"))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": REPLY}]
    png = (image_folder / "a.png").read_bytes()
    example = builder({"id": "d1", "messages": messages, "images": [{"bytes": png, "path": None}]}, 0)
    assert example["pixel_values"].shape == (1, 3, 336, 336)
    with pytest.raises(SampleError, match="sample d2: the image cannot be read"):
        builder({"id": "d2", "messages": messages, "images": [{"bytes": b"junk", "path": None}]}, 0)

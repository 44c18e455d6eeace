"""Length/modality grouping: the original's length estimates and sample order (fixture from its own functions),
and the sampler tokenpacker-train uses with --group_by_modality_length."""

import json
import os

import pytest
import torch
from transformers import TrainingArguments

from llama_processor import make_processor, sentencepiece_tokenizer
from modeling_tokenpacker.demo import build_tiny_model
from modeling_tokenpacker.training import ConversationDataset, ExampleBuilder
from modeling_tokenpacker.training.grouping import (ModalityLengthGroupedSampler, length_grouped_indices,
                                                    modality_length_grouped_indices)
from modeling_tokenpacker.training.trainer import TokenPackerTrainer

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "grouping.json")))
CASES = FIXTURE["cases"]


@pytest.fixture(scope="module")
def dataset():
    processor = make_processor(sentencepiece_tokenizer(), "pad")
    return ConversationDataset(FIXTURE["rows"], ExampleBuilder(processor, "vicuna_v1"))


def test_length_estimates_equal_the_original(dataset):
    assert dataset.lengths == FIXTURE["lengths"]
    assert dataset.modality_lengths == FIXTURE["modality_lengths"]


def test_messages_rows_estimate_their_modality_from_the_image_items(dataset):
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                          {"role": "assistant", "content": "A cat."}], "images": ["a.png"]},
            {"messages": [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi."}]}]
    messages = ConversationDataset(rows, dataset.builder)
    assert messages.modality_lengths == [6, -3]  # `<image>`, What, is, it?, A, cat. / Hello, there, Hi.
    assert messages.lengths == [6 + 128, 3]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_sample_order_equals_the_original_for_the_same_seed(case):
    torch.manual_seed(case["seed"])
    by_modality = modality_length_grouped_indices(FIXTURE["modality_lengths"], case["batch_size"], case["world_size"])
    torch.manual_seed(case["seed"])
    by_length = length_grouped_indices(FIXTURE["lengths"], case["batch_size"], case["world_size"])
    assert by_modality == case["modality_grouped_indices"]
    assert by_length == case["length_grouped_indices"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_every_full_megabatch_holds_one_modality(case):
    lengths = FIXTURE["modality_lengths"]
    size = case["batch_size"] * case["world_size"]
    order = modality_length_grouped_indices(lengths, case["batch_size"], case["world_size"],
                                            torch.Generator().manual_seed(case["seed"]))
    assert sorted(order) == list(range(len(lengths)))
    # Each modality's last mega-batch (full or not) goes to the mixed tail.
    full = (len([l for l in lengths if l > 0]) - 1) // size + (len([l for l in lengths if l < 0]) - 1) // size
    for start in range(0, full * size, size):
        assert len({lengths[i] > 0 for i in order[start:start + size]}) == 1, order[start:start + size]


def test_one_modality_only_is_length_grouped_where_the_original_fails_an_assertion():
    order = modality_length_grouped_indices([5, 9, 2, 7, 3], 2, 1, torch.Generator().manual_seed(0))
    assert order == length_grouped_indices([5, 9, 2, 7, 3], 2, 1, torch.Generator().manual_seed(0))
    assert sorted(order) == [0, 1, 2, 3, 4]


def test_a_zero_length_is_refused():
    with pytest.raises(ValueError, match="non-zero"):
        modality_length_grouped_indices([3, 0, -2], 2, 1)


def test_the_trainer_samples_with_the_original_world_size(dataset, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, gradient_accumulation_steps=2,
                             use_cpu=True, report_to="none")
    model = build_tiny_model(dataset.builder.processor.tokenizer)
    trainer = TokenPackerTrainer(model=model, args=args, train_dataset=dataset, group_by_modality_length=True)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, ModalityLengthGroupedSampler)
    assert (sampler.batch_size, sampler.world_size) == (3, 2)
    torch.manual_seed(7)
    expected = next(case for case in CASES if case["name"] == "uneven_megabatches")["modality_grouped_indices"]
    assert list(sampler) == expected
    plain = TokenPackerTrainer(model=model, args=args, train_dataset=dataset)
    assert not isinstance(plain._get_train_sampler(), ModalityLengthGroupedSampler)

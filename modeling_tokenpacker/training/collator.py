"""Batches of training examples (`ExampleBuilder` output) as the model takes them."""

import torch

from .labels import IGNORE_INDEX


class TokenPackerDataCollator:
    """Pads `input_ids` with the pad id and `labels` with -100 on `padding_side` (right by default, as the original
    trains), builds the attention mask from the lengths (a pad id inside a sample stays attended), and concatenates
    the batch's `pixel_values` `[blocks, 3, S, S]` and, in 'slice' mode, `image_grids` `[images, 2]` in sample
    order; text-only samples add none. Every example is already cut to `model_max_length` by `ExampleBuilder`.

    Returns `input_ids`, `attention_mask`, `labels` `[batch, seq]` (int64) and, when the batch has images,
    `pixel_values` (and `image_grids`)."""

    def __init__(self, pad_token_id, padding_side="right", pad_to_multiple_of=None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}.")
        if pad_token_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token before training.")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def from_processor(cls, processor, **kwargs):
        return cls(processor.tokenizer.pad_token_id, **kwargs)

    def __call__(self, examples):
        if not examples:
            raise ValueError("TokenPackerDataCollator got an empty batch.")
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = len(example["input_ids"])
            if len(example["labels"]) != size:
                raise ValueError(f"example {row}: {size} input ids but {len(example['labels'])} labels.")
            span = slice(0, size) if self.padding_side == "right" else slice(length - size, length)
            ids[row, span] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[row, span] = torch.as_tensor(example["labels"], dtype=torch.long)
            mask[row, span] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        pixels = [example["pixel_values"] for example in examples if example.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
            grids = [example["image_grids"] for example in examples if example.get("image_grids") is not None]
            if grids:
                if len(grids) != len(pixels):
                    raise ValueError("Some examples of the batch have image_grids ('slice' mode) and others not.")
                batch["image_grids"] = torch.cat([torch.as_tensor(grid) for grid in grids])
        return batch

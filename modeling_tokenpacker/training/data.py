"""Training data: the LLaVA conversation format the original trains on and 🤗 datasets' vision-language convention,
read lazily (images are opened in `__getitem__`, so in the DataLoader's workers), turned into input ids, labels and
pixel values by `LabelBuilder` and the processor, with bad samples reported by id and skipped or raised.

LLaVA format: a JSON list or JSON Lines of `{"id", "image": path | [paths] (optional), "conversations": [{"from":
"human" | "gpt", "value": "<image>\\n..."}, ...]}`, image paths relative to `image_folder`. 🤗 convention: rows with
`messages` (`{"role": "system" | "user" | "assistant", "content": str | [{"type": "image"}, {"type": "text",
"text": ...}]}`) and `images` (PIL images, paths or `{"bytes", "path"}` dicts).
"""

import io
import json
import os

import torch
from torch.utils.data import Dataset, IterableDataset
from transformers.utils import logging

from ..image_processing_common import to_rgb_image
from .grouping import estimated_length, modality_length
from .labels import IGNORE_INDEX, VICUNA_V1_SYSTEM, LabelBuilder, SampleError

logger = logging.get_logger(__name__)
ROLE_NAMES = {"user": "human", "assistant": "gpt"}


def read_llava_json(path):
    """Rows of a LLaVA JSON list (`.json`) or JSON Lines file (any other name); a SampleError names a bad line."""
    with open(path, encoding="utf-8") as handle:
        if path.endswith(".json"):
            rows = json.load(handle)
            if not isinstance(rows, list):
                raise SampleError(f"{path}: expected a JSON list of samples; got {type(rows).__name__}.")
            return rows
        rows = []
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise SampleError(f"{path} line {number}: not JSON ({error.msg}).") from None
        return rows


def turns_from_row(row, image_token, index):
    """`(sample id, turns, system text, images)` of a row in either format; images as given (paths or objects)."""
    sample_id = row.get("id", index) if isinstance(row, dict) else index
    if not isinstance(row, dict):
        raise SampleError(f"sample {sample_id}: expected an object with 'conversations' or 'messages'.")
    if "conversations" in row:
        images = row.get("image")
        images = [] if images is None else [images] if isinstance(images, str) else list(images)
        try:
            turns = [(turn["from"], turn["value"]) for turn in row["conversations"]]
        except (KeyError, TypeError):
            raise SampleError(f"sample {sample_id}: every conversation turn needs 'from' and 'value'.") from None
        return sample_id, turns, VICUNA_V1_SYSTEM, images
    if "messages" in row:
        system, turns = VICUNA_V1_SYSTEM, []
        for message in row["messages"]:
            text = message_text(message.get("content"), image_token, sample_id)
            if message.get("role") == "system":
                system = text
            else:
                turns.append((ROLE_NAMES.get(message.get("role"), message.get("role")), text))
        return sample_id, turns, system, list(row.get("images") or [])
    raise SampleError(f"sample {sample_id}: expected 'conversations' (LLaVA) or 'messages' (🤗 datasets); got keys "
                      f"{sorted(row)}.")


def message_text(content, image_token, sample_id):
    """A message's content as text, each image item written as the chat template writes it (`<image>` newline)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError(f"sample {sample_id}: message content must be a string or a list of items.")
    parts = []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "image":
            parts.append(image_token + "\n")
        elif kind == "text":
            parts.append(item.get("text", ""))
        else:
            raise SampleError(f"sample {sample_id}: content items must be of type 'image' or 'text'; got {kind!r}.")
    return "".join(parts)


def open_image(image, image_folder, sample_id):
    """An RGB PIL image from a path (relative to image_folder), a datasets `{"bytes", "path"}` dict or anything the
    processor takes, by the processor's own image rules (`to_rgb_image`); a SampleError naming the sample."""
    from PIL import Image

    if isinstance(image, dict) and not image.get("bytes"):
        image = image.get("path")
    if isinstance(image, str) and "://" not in image and not image.startswith("data:"):
        path = image if os.path.isabs(image) or image_folder is None else os.path.join(image_folder, image)
        if not os.path.isfile(path):
            raise SampleError(f"sample {sample_id}: image file {path} does not exist.")
        image = path
    try:
        return to_rgb_image(Image.open(io.BytesIO(image["bytes"])) if isinstance(image, dict) else image)
    except (ValueError, TypeError, OSError) as error:
        raise SampleError(f"sample {sample_id}: the image cannot be read ({error}).") from None


class ExampleBuilder:
    """One row -> `{"input_ids", "labels", "pixel_values", "image_grids"}` (lists, tensors or None).

    on_bad_sample: 'raise' (a SampleError naming the sample) or 'skip' (a warning naming it; the caller moves on).
    A sample is bad when an image file is missing or unreadable, when its `<image>` count differs from its images,
    when it is longer than `model_max_length` and `truncate=False` (True cuts it as the original does), or when no
    label is left to train on (e.g. the original's tokenization-mismatch masking)."""

    def __init__(self, processor, template="vicuna_v1", image_folder=None, model_max_length=None, truncate=True,
                 on_bad_sample="raise"):
        if on_bad_sample not in ("raise", "skip"):
            raise ValueError(f"on_bad_sample must be 'raise' or 'skip'; got {on_bad_sample!r}.")
        self.processor = processor
        self.labels = LabelBuilder(processor, template, model_max_length)
        self.image_folder = image_folder
        self.truncate = truncate
        self.on_bad_sample = on_bad_sample

    def __call__(self, row, index):
        """The example, or None when the sample is bad and skipped."""
        try:
            return self.build(row, index)
        except SampleError as error:
            if self.on_bad_sample == "raise":
                raise
            logger.warning(f"skipping a bad sample: {error}")
            return None

    def build(self, row, index):
        image_token = self.processor.image_token
        sample_id, turns, system, images = turns_from_row(row, image_token, index)
        placeholders = sum(text.count(image_token) for _, text in turns)
        if placeholders != len(images):
            raise SampleError(f"sample {sample_id}: {placeholders} {image_token} placeholder(s) but {len(images)} "
                              "image(s).")
        pixel_values = grids = None
        if images:
            features = self.processor.image_processor(
                [open_image(image, self.image_folder, sample_id) for image in images], return_tensors="pt")
            pixel_values, grids = features["pixel_values"], features.get("image_grids")
        ids, labels, mismatch = self.labels.build(turns, bool(images), sample_id, image_grids=grids, system=system,
                                                  truncate=self.truncate)
        if mismatch:
            raise SampleError(f"sample {sample_id}: the original's round lengths do not add up for this tokenizer "
                              "(tokenization mismatch), so it masks every label; nothing would be trained on.")
        if all(label == IGNORE_INDEX for label in labels):
            raise SampleError(f"sample {sample_id}: no label is left to train on after truncation to "
                              f"{self.labels.model_max_length} tokens.")
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "image_grids": grids}


class ConversationDataset(Dataset):
    """Map-style dataset over rows (a list, a LLaVA JSON/JSONL path or a map-style `datasets.Dataset`); each item
    is built on access. A skipped bad sample is replaced by the next good one (its id is logged)."""

    def __init__(self, rows, builder):
        self.rows = read_llava_json(rows) if isinstance(rows, (str, os.PathLike)) else rows
        self.builder = builder

    def __len__(self):
        return len(self.rows)

    @property
    def lengths(self):
        """The original's cheap length estimate of every sample (words + 128 with an image); no image is opened."""
        return [estimated_length(turns, has_image) for turns, has_image in self._texts()]

    @property
    def modality_lengths(self):
        """Word counts, positive for image samples and negative for text-only ones (`group_by_modality_length`)."""
        return [modality_length(turns, has_image) for turns, has_image in self._texts()]

    def _texts(self):
        """`(turns, has_image)` of every row, read without decoding images: a LLaVA row has an image when it has an
        'image' key (as the original counts), a `messages` row when its text has an image placeholder."""
        rows = self.rows
        if "images" in (getattr(rows, "column_names", None) or ()):
            rows = rows.select_columns([name for name in rows.column_names if name != "images"])
        image_token = self.builder.processor.image_token
        for index, row in enumerate(rows):
            _, turns, _, _ = turns_from_row(row, image_token, index)
            has_image = "image" in row if "conversations" in row else any(image_token in t for _, t in turns)
            yield turns, has_image

    def __getitem__(self, index):
        for offset in range(len(self.rows)):
            position = (index + offset) % len(self.rows)
            example = self.builder(self.rows[position], position)
            if example is not None:
                return example
        raise SampleError("every sample of the dataset is bad; see the warnings above.")


class StreamingConversationDataset(IterableDataset):
    """Iterable dataset over streamed rows (e.g. `datasets.load_dataset(..., streaming=True)`), bad samples skipped
    or raised as the builder says. With several DataLoader workers each takes every n-th row."""

    def __init__(self, rows, builder):
        self.rows = rows
        self.builder = builder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        for index, row in enumerate(self.rows):
            if info is not None and index % info.num_workers != info.id:
                continue
            example = self.builder(row, index)
            if example is not None:
                yield example

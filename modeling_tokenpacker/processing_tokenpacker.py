"""TokenPacker processor: image processor + tokenizer, with the original's prompt tokenization around images.

Shipped inside checkpoints as remote code; works from transformers 4.46 to 5.x (design.md §5: keep `attributes`
and the `*_class` names for 4.x, set `chat_template` after `super().__init__`, write `preprocessor_config.json`).
"""

import json
import os

import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

logger = logging.get_logger(__name__)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
PROCESSOR_CONFIG_NAME = "processor_config.json"
LEGACY_CHAT_TEMPLATE_NAME = "chat_template.json"


def _needs_sub_processor_class_names():
    """4.x's ProcessorMixin finds the sub-processors through `image_processor_class`/`tokenizer_class`; 5.x reads
    them from `__init__`'s signature and warns that those names are deprecated."""
    return int(transformers.__version__.split(".")[0]) < 5


def _write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _make_tokenizer_config_portable(path):
    """5.x writes `tokenizer_class: TokenizersBackend` and a list of `extra_special_tokens`, which 4.x cannot read;
    the 4.x names load in both."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        config.pop("extra_special_tokens")
        config["additional_special_tokens"] = extra
    _write_json(path, config)


class TokenPackerProcessor(ProcessorMixin):
    r"""Turns chat text with `<image>` placeholders plus images into TokenPacker model inputs.

    Each `<image>` becomes `image_seq_length` image tokens (144, 64 or 36 per 336-px block). The text around the
    images is tokenized chunk by chunk, as the original `tokenizer_image_token` does: every chunk is tokenized on its
    own, only the first keeps its BOS. Batches are padded on the tokenizer's padding side (left for generation).

    With an image processor in 'slice' mode (TokenPacker-HD), which returns each image's `(rows, cols)` block grid in
    `image_grids`, an `<image>` becomes the original's HD sequence instead: row after row, each block's run of image
    tokens, a `,` token between the blocks of a row and a `\n` token after every row; then, when there is more than
    one block, the global view's run and a `\n` token. The separator ids are the tokenizer's ids of the token
    strings `","` and `"\n"` (`convert_tokens_to_ids`, not tokenization, as the original): a LLaMA SentencePiece
    vocabulary has no `"\n"` piece, so the row separator is the `<unk>` id there.

    Args:
        image_processor (`TokenPackerImageProcessor`): prepares `pixel_values`.
        tokenizer (`PreTrainedTokenizerBase`): must know `image_token` as a (special) token.
        image_seq_length (`int`, *optional*, defaults to 144): visual tokens per 336-px block.
        chat_template (`str`, *optional*): Jinja chat template (the converter ships `vicuna_v1`).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder written in prompts.
    """

    attributes = ["image_processor", "tokenizer"]
    valid_kwargs = ["chat_template", "image_seq_length", "image_token"]
    if _needs_sub_processor_class_names():
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=144, chat_template=None, image_token="<image>", **kwargs):
        self.image_seq_length = int(image_seq_length)
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, **kwargs)
        # Old 4.x releases refuse `chat_template` in ProcessorMixin.__init__; setting it afterwards works everywhere.
        self.chat_template = chat_template
        if self.image_seq_length < 1:
            raise ValueError(f"image_seq_length must be a positive number of tokens; got {image_seq_length}.")
        if tokenizer is not None:
            self._lookup_image_token_id()  # fail at construction, not at the first call, when the token is missing

    @property
    def image_token_id(self):
        """Id of `image_token` in the tokenizer; a ValueError when the tokenizer does not know the token."""
        return self._lookup_image_token_id()

    def _lookup_image_token_id(self):
        token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                f"The tokenizer has no {self.image_token!r} token; add it with "
                f"tokenizer.add_special_tokens({{'additional_special_tokens': [{self.image_token!r}]}}) and resize "
                "the model's embeddings."
            )
        return token_id

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grids"]

    @property
    def slice_separator_ids(self):
        """`(block separator, row separator)` ids of HD sequences: the tokenizer's ids of the token strings `","`
        and `"\\n"` (unknown strings give the `<unk>` id, as in the original)."""
        ids = []
        for token in (",", "\n"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None:
                raise ValueError(
                    f"The tokenizer has neither a {token!r} token nor an unknown token, so it cannot give the HD "
                    "('slice') separator ids; set tokenizer.unk_token."
                )
            ids.append(int(token_id))
        return tuple(ids)

    def image_placeholder_ids(self, grid=None):
        """Ids that stand for one image: `image_seq_length` image tokens, or for a `(rows, cols)` HD grid the
        blocks' runs with separators and, for more than one block, the global view's run (see the class docstring).
        Their count is `L*(blocks + g) + rows*(cols-1) + rows + g` with `g = 1` when `rows*cols > 1`, else 0."""
        run = [self.image_token_id] * self.image_seq_length
        if grid is None:
            return run
        rows, cols = (int(value) for value in grid)
        if rows < 1 or cols < 1:
            raise ValueError(f"An image grid needs at least one row and one column; got {(rows, cols)}.")
        comma, newline = self.slice_separator_ids
        ids = []
        for _ in range(rows):
            for col in range(cols):
                ids.extend(run)
                if col < cols - 1:
                    ids.append(comma)
            ids.append(newline)
        if rows * cols > 1:
            ids.extend(run)
            ids.append(newline)
        return ids

    def __call__(self, images=None, text=None, return_tensors=None, padding=True, padding_side=None, **kwargs):
        """images: one image or a list (PIL, numpy, torch); text: a prompt or a list of prompts, one `<image>` per
        image in order. Returns `input_ids` and `attention_mask` `[batch, seq]` and `pixel_values`
        `[num_images, 3, 336, 336]` (when images are given); in 'slice' mode `pixel_values`
        `[total_blocks, 3, 336, 336]` and `image_grids` `[num_images, 2]`."""
        if text is None:
            raise ValueError("TokenPackerProcessor needs `text` (a prompt with one <image> per image).")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(item, str) for item in texts):
            raise TypeError(f"`text` must be a string or a list of strings; got {type(text).__name__}.")
        image_features = {}
        num_images = 0
        if images is not None:
            image_features = dict(self.image_processor(images, return_tensors=return_tensors, **kwargs.pop("images_kwargs", {})))
            grids = image_features.get("image_grids")
            num_images = len(image_features["pixel_values"]) if grids is None else len(grids)
        num_placeholders = sum(item.count(self.image_token) for item in texts)
        if num_placeholders != num_images:
            raise ValueError(
                f"The text has {num_placeholders} {self.image_token} placeholders but {num_images} images were given; "
                "write one placeholder per image."
            )
        for modality in ("videos", "audio"):
            if kwargs.pop(modality, None) is not None:
                raise ValueError(f"TokenPacker takes images and text only; got {modality}.")
        for unused in ("add_special_tokens", "truncation", "return_token_type_ids", "text_kwargs"):
            kwargs.pop(unused, None)
        if kwargs:
            # Pipelines hand generation arguments (e.g. do_sample) to the processor too, as to every processor.
            logger.warning_once(f"TokenPackerProcessor ignores the arguments {sorted(kwargs)}.")

        grids = image_features.get("image_grids")
        grids = [None] * num_images if grids is None else [tuple(int(v) for v in grid) for grid in grids]
        encoded, used = [], 0
        for item in texts:
            count = item.count(self.image_token)
            encoded.append({"input_ids": self.tokenize_with_images(item, grids[used : used + count])})
            used += count
        text_features = self.pad(encoded, padding, padding_side, return_tensors)
        return BatchFeature(data={**text_features, **image_features}, tensor_type=return_tensors)

    def tokenize_with_images(self, prompt, image_grids=None):
        """One prompt -> token ids, each `image_token` expanded to `image_seq_length` image-token ids, or, with
        `image_grids` (one `(rows, cols)` per placeholder, None for a single block), to that image's HD sequence
        (`image_placeholder_ids`).

        The chunks between placeholders are tokenized separately with special tokens; the BOS that the tokenizer
        puts at the start of every chunk is kept for the first chunk only (the original's tokenizer_image_token).
        """
        chunks = [self.tokenizer(chunk, add_special_tokens=True)["input_ids"] for chunk in prompt.split(self.image_token)]
        bos = self.tokenizer.bos_token_id
        drop_bos = bos is not None and len(chunks[0]) > 0 and chunks[0][0] == bos
        image_grids = [None] * (len(chunks) - 1) if image_grids is None else list(image_grids)
        if len(image_grids) != len(chunks) - 1:
            raise ValueError(f"The prompt has {len(chunks) - 1} {self.image_token} placeholders but "
                             f"{len(image_grids)} image grids were given.")
        input_ids = list(chunks[0])
        for chunk, grid in zip(chunks[1:], image_grids):
            input_ids.extend(self.image_placeholder_ids(grid))
            input_ids.extend(chunk[1:] if drop_bos and chunk[:1] == [bos] else chunk)
        return input_ids

    def pad(self, encoded, padding, padding_side, return_tensors):
        side = padding_side or self.tokenizer.padding_side
        if self.tokenizer.pad_token_id is None and len(encoded) > 1 and padding:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token to pad a batch.")
        if not padding or len(encoded) == 1:
            features = {
                "input_ids": [item["input_ids"] for item in encoded],
                "attention_mask": [[1] * len(item["input_ids"]) for item in encoded],
            }
            if return_tensors is not None and len({len(ids) for ids in features["input_ids"]}) > 1:
                raise ValueError("Prompts of different lengths need padding=True to become one tensor.")
            return dict(BatchFeature(features, tensor_type=return_tensors))
        previous_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = side
        try:
            padded = self.tokenizer.pad(encoded, padding=padding, return_tensors=return_tensors, return_attention_mask=True)
        finally:
            self.tokenizer.padding_side = previous_side
        return {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save as ProcessorMixin does, with the remote-code files, then make the folder readable by 4.x too."""
        if type(self)._auto_class is None:
            type(self).register_for_auto_class("AutoProcessor")
        if type(self.image_processor)._auto_class is None:
            type(self.image_processor).register_for_auto_class("AutoImageProcessor")
        result = super().save_pretrained(save_directory, **kwargs)
        self._write_portable_files(save_directory)
        return result

    def _write_portable_files(self, save_directory):
        """5.x saves differ from what 4.x reads: 5.x nests the image processor in `processor_config.json` (4.x passes
        that entry to `__init__` twice) and writes no `preprocessor_config.json`; 4.46 reads the chat template only
        from `chat_template.json`; tokenizer names as in `_make_tokenizer_config_portable`. Both read the result."""
        image_processor_config = self.image_processor.to_dict()
        image_processor_config["auto_map"] = {
            "AutoImageProcessor": f"image_processing_tokenpacker.{type(self.image_processor).__name__}",
            "AutoProcessor": f"processing_tokenpacker.{type(self).__name__}",
        }
        _write_json(os.path.join(save_directory, PREPROCESSOR_CONFIG_NAME), image_processor_config)
        processor_config_path = os.path.join(save_directory, PROCESSOR_CONFIG_NAME)
        if os.path.exists(processor_config_path):
            with open(processor_config_path, encoding="utf-8") as handle:
                processor_config = json.load(handle)
            processor_config.pop("image_processor", None)
            processor_config.pop("tokenizer", None)
            _write_json(processor_config_path, processor_config)
        if self.chat_template is not None:
            _write_json(os.path.join(save_directory, LEGACY_CHAT_TEMPLATE_NAME), {"chat_template": self.chat_template})
        _make_tokenizer_config_portable(os.path.join(save_directory, TOKENIZER_CONFIG_NAME))

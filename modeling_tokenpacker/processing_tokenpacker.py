"""TokenPacker processor: image processor + tokenizer, with the original's prompt tokenization around images.

Shipped inside checkpoints as remote code; works from transformers 4.46 to 5.x (design.md §5: keep `attributes`
and the `*_class` names for 4.x, set `chat_template` after `super().__init__`, write `preprocessor_config.json`).
"""

import json
import os

import transformers
from transformers import processing_utils
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import logging

from .image_processing_common import flatten_images
from .processing_common import encode_prompt, images_for_prompts, pad_batch, prompts_from_text, split_options, truncate

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


def _class_reference(cls):
    """`module.Class` as an `auto_map` names a class of the checkpoint's own files."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


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

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """images: an image or a (nested) list of them — PIL images, numpy arrays, torch tensors, paths, file:// or
        http(s) URLs, base64 data — flat in prompt order or one list per prompt; text: a prompt or a list of prompts,
        one `<image>` per image. Returns `input_ids` and `attention_mask` `[batch, seq]` and `pixel_values`
        `[num_images, 3, 336, 336]` (when images are given; images alone give only these); in 'slice' mode
        `pixel_values` `[total_blocks, 3, 336, 336]` and `image_grids` `[num_images, 2]`.

        The tokenizer's arguments: `padding` (True / 'longest' by default, 'max_length', False), `max_length`,
        `pad_to_multiple_of`, `padding_side` (the tokenizer's by default; the tokenizer itself is left unchanged),
        `truncation` (text only: a cut through image tokens is a ValueError), `add_special_tokens`,
        `return_attention_mask`, `return_offsets_mapping` (offsets into the prompt with each `<image>` replaced by
        the text of its tokens), `return_text_replacement_offsets`, `return_tensors`. Image-processor arguments
        (`image_aspect_ratio`, `patch_num`, `input_data_format`) go to the image processor, also nested as
        `images_kwargs`."""
        options, image_options = split_options({**kwargs, "videos": videos, "audio": audio}, type(self).__name__)
        return_tensors = options["return_tensors"]
        if text is None:
            if images is None:
                raise ValueError("TokenPackerProcessor needs text, images or both.")
            return BatchFeature(dict(self.image_processor(images, return_tensors=return_tensors, **image_options)),
                                tensor_type=return_tensors)
        prompts = prompts_from_text(text)
        flat_images, counts = images_for_prompts(images, prompts, self.image_token, flatten_images)
        image_features = {}
        grids = [None] * len(flat_images)
        if flat_images:
            image_features = dict(self.image_processor(flat_images, return_tensors=return_tensors, **image_options))
            if image_features.get("image_grids") is not None:
                grids = [tuple(int(v) for v in grid) for grid in image_features["image_grids"]]
        with_offsets = options["return_offsets_mapping"]
        if with_offsets and not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("return_offsets_mapping (and return_assistant_tokens_mask) need a fast tokenizer.")
        boundary = self.image_boundary()
        encoded, used = [], 0
        for index, prompt in enumerate(prompts):
            expansions = [self.image_expansion(grid) for grid in grids[used: used + counts[index]]]
            used += counts[index]
            ids, offsets, replacements = encode_prompt(self.tokenizer, prompt, self.image_token, expansions,
                                                       options["add_special_tokens"], with_offsets, boundary)
            if options["return_text_replacement_offsets"]:
                self._check_replacements(expansions, replacements, boundary)
            max_length = options["max_length"] or self._model_max_length()
            if options["truncation"] not in (False, None, "do_not_truncate") and max_length is not None:
                ids, offsets = truncate(ids, offsets, max_length, self.tokenizer.truncation_side,
                                        self.image_token_id, index)
            encoded.append((ids, offsets, replacements))
        side = options["padding_side"] or self.tokenizer.padding_side
        ids, masks, offsets = pad_batch([item[0] for item in encoded], [item[1] for item in encoded],
                                        self.tokenizer.pad_token_id, options["padding"], options["max_length"],
                                        options["pad_to_multiple_of"], side)
        if return_tensors is not None and len({len(item) for item in ids}) > 1:
            raise ValueError("Prompts of different lengths need padding=True to become one tensor.")
        data = {"input_ids": ids}
        if options["return_attention_mask"]:
            data["attention_mask"] = masks
        if with_offsets:
            data["offset_mapping"] = offsets
        features = BatchFeature(data={**data, **image_features}, tensor_type=return_tensors)
        if options["return_text_replacement_offsets"]:
            features["text_replacement_offsets"] = [item[2] for item in encoded]  # never a tensor
        return features

    def tokenize_with_images(self, prompt, image_grids=None):
        """One prompt -> token ids, each `image_token` expanded to `image_seq_length` image-token ids, or, with
        `image_grids` (one `(rows, cols)` per placeholder, None for a single block), to that image's HD sequence;
        the text around them tokenized as the original's `tokenizer_image_token` does (`encode_prompt`)."""
        grids = [None] * prompt.count(self.image_token) if image_grids is None else list(image_grids)
        ids, _, _ = encode_prompt(self.tokenizer, prompt, self.image_token, [self.image_expansion(g) for g in grids])
        return ids

    def _model_max_length(self):
        """The tokenizer's `model_max_length` when it is a real limit (transformers' "no limit" is a huge number)."""
        length = getattr(self.tokenizer, "model_max_length", None)
        return length if isinstance(length, int) and length < 10**8 else None

    def image_expansion(self, grid=None):
        """`(ids, text)` one `<image>` becomes: `image_placeholder_ids(grid)` and the text of those tokens (each image
        token written as `<image>`), which offsets and `text_replacement_offsets` refer to."""
        ids = self.image_placeholder_ids(grid)
        return ids, "".join(self.tokenizer.convert_ids_to_tokens(ids))

    def image_boundary(self):
        """`(ids, text)` that the original's chunk-wise tokenization puts between an image and the newline after it
        but a tokenization of the whole prompt leaves out; `((), "")` when the two agree.

        A SentencePiece-style tokenizer that writes its `▁` prefix only at the start of a text (LLaMA's with
        `legacy=False`, as converted checkpoints have) starts the chunk after `<image>` with a lone `▁` that the
        whole prompt does not have there. Every image's replacement text ends with that text, so a serving stack
        that tokenizes the prompt whole and encodes each replacement on its own (vLLM) gets the original's ids for
        every `<image>` followed by a newline, as the chat template and LLaVA prompts write it."""
        tokenizer = self.tokenizer
        alone = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        whole = list(tokenizer(self.image_token + "\n", add_special_tokens=False)["input_ids"])[1:]
        extra = alone[: len(alone) - len(whole)]
        if not whole or not extra or alone[len(extra):] != whole:
            return (), ""
        text = "".join(tokenizer.convert_ids_to_tokens(extra))
        encoded = list(tokenizer(self.image_token + text + "\n", add_special_tokens=False)["input_ids"])[1:]
        return (tuple(extra), text) if encoded == alone else ((), "")

    def replace_image_token(self, image_inputs, image_idx, **kwargs):
        """The text image `image_idx` of `image_inputs` (an image-processor output) takes in the expanded prompt
        (transformers 5.x's replacement hook): its tokens' text, then `image_boundary()`'s."""
        grids = image_inputs.get("image_grids") if isinstance(image_inputs, dict) else None
        grid = None if grids is None else tuple(int(v) for v in grids[image_idx])
        return self.image_expansion(grid)[1] + self.image_boundary()[1]

    def _check_replacements(self, expansions, replacements, boundary):
        """Warn once when a replacement text, tokenized on its own as vLLM does, does not give the image's ids (a
        tokenizer that writes `▁` before every text turns HD's `,` separator into `▁,`)."""
        for (ids, _), entry in zip(expansions, replacements):
            encoded = list(self.tokenizer(entry["replacement"], add_special_tokens=False)["input_ids"])
            if encoded != list(ids) + list(boundary[0]):
                changed = sorted(set(self.tokenizer.convert_ids_to_tokens(sorted(set(encoded) - set(ids)))))
                logger.warning_once(
                    "An image's replacement text, tokenized on its own (as vLLM does), gives other ids than the "
                    f"image stands for (new tokens {changed[:5]}): served that way the language model sees other "
                    "separator ids than the original's. A tokenizer that adds '▁' only at the start of a text "
                    "(LLaMA's legacy=False) gives the same ids."
                )
                return

    def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
        """Per image of `image_sizes` (`(height, width)` pairs), what serving stacks (vLLM) ask of transformers'
        processors: `num_image_tokens`, the image-token positions its placeholder becomes (its blocks' packed
        tokens; HD's separators are text tokens), and `num_image_patches`, its rows of `pixel_values` (1, or in
        'slice' mode the grid's blocks plus the global view when there is more than one). `image_aspect_ratio`
        and `patch_num` as in a call."""
        _, image_options = split_options(kwargs, type(self).__name__)
        mode = image_options.get("image_aspect_ratio") or self.image_processor.image_aspect_ratio
        patch_num = image_options.get("patch_num")
        tokens, patches = [], []
        for height, width in image_sizes or ():
            blocks = 1
            if mode == "slice":
                rows, cols = self.image_processor.slice_grid(int(height), int(width), patch_num)
                blocks = rows * cols + (1 if rows * cols > 1 else 0)
            tokens.append(blocks * self.image_seq_length)
            patches.append(blocks)
        # transformers' own container where the release has one (4.52 on), else a dict with the same keys.
        container = getattr(processing_utils, "MultiModalData", dict)
        return container(num_image_tokens=tokens, num_image_patches=patches)

    def apply_chat_template(self, conversation, *args, **kwargs):
        """As `ProcessorMixin.apply_chat_template`, after checking that `conversation` is a non-empty list of
        messages (dicts with a role and content), or a list of such lists."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ValueError(f"apply_chat_template needs a non-empty list of messages; got {conversation!r}.")
        conversations = conversation if isinstance(conversation[0], (list, tuple)) else [conversation]
        for messages in conversations:
            if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                raise ValueError("apply_chat_template needs messages of the form {'role': ..., 'content': ...}; got "
                                 f"{messages!r}"[:300] + ".")
        return super().apply_chat_template(conversation, *args, **kwargs)

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
            "AutoImageProcessor": _class_reference(type(self.image_processor)),
            "AutoProcessor": _class_reference(type(self)),
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

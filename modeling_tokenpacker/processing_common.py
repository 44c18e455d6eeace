"""The text side every processor of this package shares: prompts and their images checked, the original's
chunk-by-chunk tokenization around image placeholders (each placeholder replaced by the ids its image stands for),
offsets, truncation that never cuts an image, padding in every form — all without changing the tokenizer's state,
so one processor can serve several threads.

Shipped inside checkpoints as remote code with the processors (imports transformers only).
"""

from transformers.utils import logging

logger = logging.get_logger(__name__)

TEXT_OPTIONS = {
    "padding": True, "padding_side": None, "truncation": False, "max_length": None, "pad_to_multiple_of": None,
    "add_special_tokens": True, "return_attention_mask": True, "return_offsets_mapping": False,
    "return_text_replacement_offsets": False, "return_tensors": None,
}
# Accepted for the tokenizer's sake and without effect here (no token type ids, no overflow).
IGNORED_TEXT_OPTIONS = ("return_token_type_ids", "return_mm_token_type_ids", "return_overflowing_tokens",
                        "return_special_tokens_mask", "return_length", "verbose", "stride", "is_split_into_words")
IMAGE_OPTIONS = ("image_aspect_ratio", "patch_num", "input_data_format", "do_convert_rgb", "data_format")


def split_options(kwargs, owner):
    """`(text options, image options)` from a processor call's keyword arguments, flat or nested as transformers
    passes them (`text_kwargs`, `images_kwargs`, `common_kwargs`). Options of other kinds (pipelines hand
    generation arguments to every processor) are ignored with one warning."""
    kwargs = dict(kwargs)
    nested = {}
    for group in ("common_kwargs", "text_kwargs", "images_kwargs"):
        nested.update(kwargs.pop(group, None) or {})
    kwargs = {**nested, **kwargs}
    text = dict(TEXT_OPTIONS)
    images = {}
    for key in list(kwargs):
        if key in TEXT_OPTIONS:
            text[key] = kwargs.pop(key)
        elif key in IMAGE_OPTIONS:
            images[key] = kwargs.pop(key)
        elif key in IGNORED_TEXT_OPTIONS:
            kwargs.pop(key)
    for modality in ("videos", "audio"):
        if kwargs.pop(modality, None) is not None:
            raise ValueError(f"{owner} takes images and text only; got {modality}.")
    if kwargs:
        logger.warning_once(f"{owner} ignores the arguments {sorted(kwargs)}.")
    return text, images


def prompts_from_text(text):
    """`text` (a prompt or a list of prompts) -> list of prompts; a TypeError or ValueError for anything else."""
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError("`text` is an empty list; expected a prompt or a list of prompts.")
        bad = [f"{index}: {type(item).__name__}" for index, item in enumerate(text) if not isinstance(item, str)]
        if bad:
            raise TypeError(f"`text` must be a string or a list of strings; items {', '.join(bad[:5])} are not.")
        return list(text)
    raise TypeError(f"`text` must be a string or a list of strings; got {type(text).__name__}.")


def images_for_prompts(images, prompts, placeholder, flatten):
    """The images in prompt order, checked against the placeholders: `images` flat (one per placeholder, in order)
    or nested, one list per prompt. Returns (flat images, placeholders per prompt)."""
    counts = [prompt.count(placeholder) for prompt in prompts]
    if images is None:
        flat = []
    elif isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images):
        per_prompt = [len(flatten(item)) for item in images]
        if len(images) != len(prompts) or per_prompt != counts:
            raise ValueError(f"The images are nested per prompt ({per_prompt} images for {len(images)} prompts) but "
                             f"the prompts hold {counts} {placeholder} placeholders; give each prompt as many images as "
                             "it has placeholders.")
        flat = flatten(images)
    else:
        flat = flatten(images)
    if len(flat) != sum(counts):
        raise ValueError(f"The text has {sum(counts)} {placeholder} placeholders ({counts} per prompt) but "
                         f"{len(flat)} images were given; write one placeholder per image.")
    return flat, counts


def encode_prompt(tokenizer, prompt, placeholder, expansions, add_special_tokens=True, with_offsets=False,
                  boundary=((), "")):
    """One prompt -> (ids, offsets, replacements), the original's `tokenizer_image_token` with each placeholder
    replaced: the chunks between placeholders are tokenized on their own with special tokens and the BOS every chunk
    gets is kept for the first chunk only (none at all with `add_special_tokens=False`); a prompt that starts with
    the BOS text (as the chat template writes it, for serving stacks that tokenize rendered chats without special
    tokens) gets that BOS only, not a second one.

    `expansions`: per placeholder `(ids, text)`: the ids it becomes and the text they stand for. `boundary`:
    `(ids, text)` of what the chunk-wise tokenization puts at the start of the text after a placeholder but a
    tokenization of the whole expanded prompt would not (see `image_boundary`); its text ends each replacement and
    the chunk's leading boundary ids are placed on it. Offsets are `(start, end)` per token in the expanded prompt
    (the prompt with each placeholder replaced by its replacement), as transformers' `text_replacement_offsets`
    describe it: one `{"type", "span", "new_span", "text", "replacement"}` per placeholder."""
    chunks = prompt.split(placeholder)
    if len(expansions) != len(chunks) - 1:
        raise ValueError(f"The prompt has {len(chunks) - 1} {placeholder} placeholders but {len(expansions)} images "
                         "were given for it.")
    bos = tokenizer.bos_token_id
    boundary_ids, boundary_text = list(boundary[0]), boundary[1]
    ids, offsets, replacements = [], [], []
    source = expanded = 0  # where the next chunk starts in the prompt and in the expanded prompt
    for index, chunk in enumerate(chunks):
        encoded = tokenizer(chunk, add_special_tokens=True, return_offsets_mapping=with_offsets)
        chunk_ids = list(encoded["input_ids"])
        chunk_offsets = [tuple(pair) for pair in encoded["offset_mapping"]] if with_offsets else [(0, 0)] * len(chunk_ids)
        written_bos = (index == 0 and bos is not None and chunk.startswith(tokenizer.bos_token)
                       and chunk_ids[:2] == [bos, bos])
        if bos is not None and chunk_ids[:1] == [bos] and (index > 0 or not add_special_tokens or written_bos):
            chunk_ids, chunk_offsets = chunk_ids[1:], chunk_offsets[1:]
        lead = len(boundary_ids) if index > 0 and boundary_ids and chunk_ids[:len(boundary_ids)] == boundary_ids else 0
        ids.extend(chunk_ids)
        offsets.extend([(expanded - len(boundary_text), expanded)] * lead)
        offsets.extend((start + expanded, end + expanded) if end > start else (expanded, expanded)
                       for start, end in chunk_offsets[lead:])
        source += len(chunk)
        expanded += len(chunk)
        if index == len(chunks) - 1:
            break
        expansion_ids, text = expansions[index]
        width = len(text) / max(len(expansion_ids), 1)
        ids.extend(expansion_ids)
        offsets.extend((expanded + round(k * width), expanded + round((k + 1) * width))
                       for k in range(len(expansion_ids)))
        replacement = text + boundary_text
        replacements.append({"type": "image", "span": (source, source + len(placeholder)),
                             "new_span": (expanded, expanded + len(replacement)), "text": placeholder,
                             "replacement": replacement})
        source += len(placeholder)
        expanded += len(replacement)
    return ids, offsets, replacements


def truncate(ids, offsets, max_length, side, protected_id, index):
    """Cut a prompt's ids (and offsets) to `max_length` from `side`; a ValueError, as transformers' own
    processors give, when that would cut into the image tokens (`protected_id`)."""
    if len(ids) <= max_length:
        return ids, offsets
    kept = slice(None, max_length) if side == "right" else slice(len(ids) - max_length, None)
    removed = ids[max_length:] if side == "right" else ids[: len(ids) - max_length]
    if protected_id in removed:
        raise ValueError(f"Truncating prompt {index} from {len(ids)} to max_length={max_length} tokens would cut "
                         "through its image tokens; raise max_length, shorten the text, or pass truncation=False.")
    return ids[kept], offsets[kept]


def pad_batch(batch_ids, batch_offsets, pad_id, padding, max_length, pad_to_multiple_of, side):
    """Padded `(input_ids, attention_mask, offsets)` lists. `padding`: True/'longest' (to the longest prompt),
    'max_length' (to `max_length`), False/'do_not_pad'."""
    if padding in (True, "longest"):
        target = max(len(ids) for ids in batch_ids)
    elif padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length.")
        target = max(max_length, max(len(ids) for ids in batch_ids))
    elif padding in (False, None, "do_not_pad"):
        target = None
    else:
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad'; got {padding!r}.")
    if target is not None and pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right'; got {side!r}.")
    out_ids, out_masks, out_offsets = [], [], []
    for ids, offsets in zip(batch_ids, batch_offsets):
        missing = 0 if target is None else target - len(ids)
        if missing and pad_id is None:
            raise ValueError("The tokenizer has no pad token; set tokenizer.pad_token to pad.")
        fill, zeros, no_offsets = [pad_id] * missing, [0] * missing, [(0, 0)] * missing
        if side == "left":
            out_ids.append(fill + ids), out_masks.append(zeros + [1] * len(ids)), out_offsets.append(no_offsets + offsets)
        else:
            out_ids.append(ids + fill), out_masks.append([1] * len(ids) + zeros), out_offsets.append(offsets + no_offsets)
    return out_ids, out_masks, out_offsets

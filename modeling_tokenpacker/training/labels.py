"""Training input ids and labels built as the original's preprocessing builds them (llava/train/train.py of
CircleRadon/TokenPacker: `preprocess_multimodal`, then `preprocess_v1` or `preprocess_plain`), then each image
placeholder expanded to the ids the processor gives that image, with -100 labels.

Exactness is tested against figures from running the original's functions (tests/fixtures/labels.json). That
includes its masking rule: the labels are computed from the length of each round tokenized on its own, and when
those lengths do not add up to the conversation's (`"tokenization mismatch"`, which a LLaMA tokenizer with
`legacy=False` produces for every multi-turn conversation, as '▁USER' after '</s>' becomes 'US', 'ER'), the whole
sample is masked. `build_example` reports that instead of letting such a sample train on nothing unnoticed.
"""

from ..processing_common import encode_prompt

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = -200  # the original's IMAGE_TOKEN_INDEX, between the chunks before expansion
VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
TEMPLATES = ("vicuna_v1", "plain")


class SampleError(ValueError):
    """A training sample that cannot be used as it is; the message names the sample."""


def move_image_to_front(text, image_token):
    """`preprocess_multimodal`: a message holding the placeholder becomes placeholder, newline, the rest stripped."""
    if image_token not in text:
        return text
    return (image_token + "\n" + text.replace(image_token, "").strip()).strip()


def vicuna_v1_prompt(turns, system=VICUNA_V1_SYSTEM):
    """The original's vicuna_v1 `get_prompt()`: `{system} USER: {q} ASSISTANT: {a}</s>USER: ...`. `turns`:
    `(role, text)` with roles 'human'/'gpt' alternating from 'human'."""
    prompt = system + " "
    for index, (role, text) in enumerate(turns):
        prompt += ROLES[role] + ": " + text + (" " if index % 2 == 0 else "</s>")
    return prompt


def check_turns(turns, sample_id):
    """Roles known, alternating from 'human' (a leading 'gpt' turn is dropped, as the original does)."""
    unknown = sorted({role for role, _ in turns} - set(ROLES))
    if unknown:
        raise SampleError(f"sample {sample_id}: roles must be 'human' or 'gpt'; got {unknown}.")
    if turns and turns[0][0] == "gpt":
        turns = turns[1:]
    for index, (role, _) in enumerate(turns):
        if role != ("human" if index % 2 == 0 else "gpt"):
            raise SampleError(f"sample {sample_id}: turns must alternate human/gpt; turn {index} is {role!r}.")
    if len(turns) < 2:
        raise SampleError(f"sample {sample_id}: needs a human turn and a gpt reply; got {len(turns)} turn(s).")
    return turns


class LabelBuilder:
    """`(input_ids, labels)` of one conversation for a processor (`TokenPackerProcessor`): the template's prompt
    tokenized as the original does (chunks around the placeholder, one BOS), labels as the original masks them, then
    every placeholder replaced by its image's ids (`image_grids`: one `(rows, cols)` per image in 'slice' mode) and
    cut to `model_max_length` (the original's collator and model both cut there).

    template: 'vicuna_v1' (stage 2: the assistant replies and their '</s>' supervised) or 'plain' (stage 1: the
    caption after the image, and the newline separator, supervised)."""

    def __init__(self, processor, template="vicuna_v1", model_max_length=None):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}; got {template!r}.")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.model_max_length = model_max_length or self.tokenizer.model_max_length
        self.image_token = processor.image_token

    def tokenize(self, text):
        """The original's `tokenizer_image_token`: ids with one `IMAGE_PLACEHOLDER` per image placeholder."""
        count = text.count(self.image_token)
        return encode_prompt(self.tokenizer, text, self.image_token, [([IMAGE_PLACEHOLDER], self.image_token)] * count)[0]

    def build(self, turns, has_image, sample_id="?", image_grids=None, system=VICUNA_V1_SYSTEM, truncate=True):
        """turns: `(role, text)` pairs; system: vicuna_v1's system text. Returns `(input_ids, labels, mismatch)`;
        `mismatch` is True when the original's round lengths did not add up and it masked the whole sample (see the
        module docstring). truncate=False: a SampleError instead of the original's cut at `model_max_length`."""
        if has_image:
            turns = [(role, move_image_to_front(text, self.image_token)) for role, text in turns]
        if self.template == "plain":
            ids, labels, mismatch = self._plain(turns, has_image, sample_id)
        else:
            ids, labels, mismatch = self._vicuna_v1(check_turns(turns, sample_id), has_image, system, truncate)
        ids, labels = self._expand(ids, labels, image_grids, sample_id)
        if not truncate and len(ids) > self.model_max_length:
            raise SampleError(f"sample {sample_id}: {len(ids)} tokens, more than model_max_length="
                              f"{self.model_max_length} (truncate=True cuts it there, as the original does).")
        return ids[: self.model_max_length], labels[: self.model_max_length], mismatch

    def _plain(self, turns, has_image, sample_id):
        if len(turns) != 2 or not has_image or self.image_token not in turns[0][1]:
            raise SampleError(f"sample {sample_id}: the 'plain' template takes an image and a caption (two turns, "
                              f"{self.image_token} in the first); got {len(turns)} turn(s), image: {has_image}.")
        prompt = self.image_token + turns[1][1] + "\n"
        ids = self.tokenize(prompt)
        masked = len(self.tokenize(self.image_token))
        return ids, [IGNORE_INDEX] * masked + ids[masked:], False

    def _vicuna_v1(self, turns, has_image, system, truncate):
        conversation = vicuna_v1_prompt(turns, system)
        if has_image or not truncate:
            ids = self.tokenize(conversation)
        else:  # the original tokenizes text-only conversations whole, cut to model_max_length
            ids = list(self.tokenizer(conversation, truncation=True, max_length=self.model_max_length)["input_ids"])
        labels = list(ids)
        total = sum(token != self.tokenizer.pad_token_id for token in ids)
        separator = " " + ROLES["gpt"] + ": "
        position = 1
        labels[:1] = [IGNORE_INDEX]
        for round_text in conversation.split("</s>"):
            if round_text == "":
                break
            parts = round_text.split(separator)
            if len(parts) != 2:
                break
            instruction_length = len(self.tokenize(parts[0] + separator)) - 2
            labels[position: position + instruction_length] = [IGNORE_INDEX] * len(
                labels[position: position + instruction_length])
            position += len(self.tokenize(round_text))
        labels[position:] = [IGNORE_INDEX] * len(labels[position:])
        mismatch = position < self.model_max_length and position != total
        if mismatch:
            labels = [IGNORE_INDEX] * len(labels)
        return ids, labels, mismatch

    def _expand(self, ids, labels, image_grids, sample_id):
        count = ids.count(IMAGE_PLACEHOLDER)
        grids = [None] * count if image_grids is None else [tuple(int(v) for v in g) for g in image_grids]
        if len(grids) != count:
            raise SampleError(f"sample {sample_id}: {count} image placeholder(s) but {len(grids)} image grid(s).")
        out_ids, out_labels, used = [], [], 0
        for token, label in zip(ids, labels):
            if token == IMAGE_PLACEHOLDER:
                expansion = self.processor.image_placeholder_ids(grids[used])
                used += 1
                out_ids.extend(expansion)
                out_labels.extend([IGNORE_INDEX] * len(expansion))
            else:
                out_ids.append(token)
                out_labels.append(label)
        return out_ids, out_labels

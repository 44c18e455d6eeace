"""VLoRA processor: image processor + tokenizer, with the original's prompt tokenization around the one image
placeholder.

Shipped inside checkpoints as remote code; works from transformers 4.46 to 5.x (as processing_tokenpacker.py).
"""

# transformers 4.46 copies only the relative imports an entry module names itself into its module cache: every
# module this one needs, directly or not, is named here.
from .image_processing_common import flatten_images  # noqa: F401
from .processing_common import prompts_from_text
from .processing_tokenpacker import TokenPackerProcessor


class VLoRAProcessor(TokenPackerProcessor):
    r"""Turns chat text with `<image>` placeholders plus images into VLoRA model inputs.

    VLoRA puts no visual tokens in the prompt: each `<image>` stays **one** placeholder id (the tokenizer's id of
    `image_token`, which the model embeds as `<unk>` and masks out of attention), and the image reaches the model as
    `pixel_values`, from which it generates the language model's deltas. The text around the placeholder is
    tokenized chunk by chunk as the original `tokenizer_image_token` does (every chunk on its own, only the first
    keeps its BOS). A prompt holds at most one image. Batches are padded on the tokenizer's padding side (left for
    generation).

    Args:
        image_processor (`VLoRAImageProcessor`): prepares `pixel_values` ('pad' by default).
        tokenizer (`PreTrainedTokenizerBase`): must know `image_token` as a (special) token.
        chat_template (`str`, *optional*): Jinja chat template (the converter ships `vicuna_v1`).
        image_token (`str`, *optional*, defaults to `"<image>"`): the placeholder written in prompts.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_token="<image>", **kwargs):
        kwargs.pop("image_seq_length", None)  # always 1; saved by the parent's `valid_kwargs`
        super().__init__(image_processor, tokenizer, image_seq_length=1, chat_template=chat_template,
                         image_token=image_token, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """images: an image or a (nested) list of them (as `TokenPackerProcessor`); text: a prompt or a list of
        prompts, each with at most one `<image>`. Returns `input_ids` and `attention_mask` `[batch, seq]` with one
        placeholder id per image, and `pixel_values` `[num_images, 3, 336, 336]` when images are given. The
        tokenizer's arguments as for `TokenPackerProcessor`."""
        if text is not None:
            counts = [prompt.count(self.image_token) for prompt in prompts_from_text(text)]
            if any(count > 1 for count in counts):
                raise ValueError(f"VLoRA conditions a sequence on one image; the prompts hold {counts} "
                                 f"{self.image_token} placeholders. Write at most one per prompt.")
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

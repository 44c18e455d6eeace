"""The processor of a converted checkpoint in miniature: the committed LLaMA SentencePiece fixture loaded as the
converter loads a checkpoint's tokenizer, and a processor around it."""

import os

from transformers import LlamaTokenizerFast

from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor, load_chat_template

SENTENCEPIECE_DIR = os.path.join(os.path.dirname(__file__), "fixtures", "tokenizer")


def sentencepiece_tokenizer():
    """`LlamaTokenizerFast` (`legacy=False`, as Vicuna's) with `<image>` and `<pad>` added, left padding."""
    tokenizer = LlamaTokenizerFast.from_pretrained(SENTENCEPIECE_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"], "pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    return tokenizer


def make_processor(tokenizer, mode, image_seq_length=16):
    return TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio=mode), tokenizer,
                                image_seq_length=image_seq_length, chat_template=load_chat_template())

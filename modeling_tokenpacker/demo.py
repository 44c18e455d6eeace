"""The main job: chat about an image with a TokenPacker checkpoint.

    tokenpacker-demo                      # the embedded model, trained on the shapes task, answers a quiz
    tokenpacker-demo --random-weights     # a tiny random checkpoint built offline: a smoke run of the pipeline
    tokenpacker-demo --model PATH --image FILE --prompt "What is in the image?"

With no arguments the embedded checkpoint (`demo_model/`, a tiny TokenPacker trained from scratch on
`shapes_task.py`; see `demo_quiz.py`) is written out with its remote code; a fresh Python process that does not
import this package loads it through `AutoModelForImageTextToText(..., trust_remote_code=True)` and answers questions
about freshly generated pictures, and the answers are scored. With `--random-weights` a tiny random checkpoint (CLIP-
shaped tower with the real 24 x 24 patch grid, tiny LLaMA) goes the same way and answers one prompt about a
synthesized image. Both print the visual token counts and timings. Not shipped inside checkpoints.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image
import transformers
from transformers import AutoModelForImageTextToText, AutoProcessor, TextStreamer

# `from_pretrained` takes `dtype` since transformers 4.56, `torch_dtype` before.
DTYPE_KWARG = "dtype" if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56) else "torch_dtype"

TINY_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: What is in the image? Describe the "
    "image briefly. The image shows a red circle on a blue and green gradient, a cat, a dog, a tree, a house, "
    "the sky, the sea, a person riding a bicycle, numbers 0 1 2 3 4 5 6 7 8 9, and punctuation , . ! ? : ; ' \" "
)


def build_tiny_tokenizer(corpus=TINY_CORPUS):
    """A LLaMA-like fast tokenizer (BPE, `▁` word prefix, BOS added) trained in-process on a tiny corpus, with
    `<image>` and `<pad>` added as special tokens; left padding for generation. No byte fallback: every id decodes
    to visible text, so a random model's answer is never empty."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator([corpus] * 4, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
        padding_side="left",
    )


def build_tiny_model(tokenizer, projector_type="tokenpacker", scale_factor=2, text_config=None, seed=0,
                     vision_config=None, **config_kwargs):
    """A random TokenPacker model: CLIP-shaped vision tower (336 px, patch 14, 24 layers of width 64, or
    `vision_config`), projector of width 64, LLaMA with 2 layers of width 64 (or `text_config`); `config_kwargs` go
    to `TokenPackerConfig` (e.g. `region_feature_layers` for another tower depth). Seconds to build, a few MB."""
    from modeling_tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration

    vocab_size = len(tokenizer)
    default_vision_config = {
        "model_type": "clip_vision_model",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 24,
        "num_attention_heads": 2,
        "image_size": 336,
        "patch_size": 14,
        "projection_dim": 64,
    }
    default_text_config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }
    vision_config = dict(vision_config or default_vision_config)
    text_config = dict(text_config or default_text_config)
    text_config.update(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = TokenPackerConfig(
        vision_config=vision_config,
        text_config=text_config,
        projector_type=projector_type,
        scale_factor=scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{"projector_hidden_size": 64, "projector_num_heads": 2, **config_kwargs},
    )
    torch.manual_seed(seed)
    model = TokenPackerForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_tiny_processor(tokenizer, image_seq_length):
    from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor, load_chat_template

    return TokenPackerProcessor(
        TokenPackerImageProcessor(), tokenizer, image_seq_length=image_seq_length, chat_template=load_chat_template()
    )


def synthesize_image(width=480, height=360):
    """A deterministic test picture: a colour gradient with a filled circle."""
    y, x = np.mgrid[0:height, 0:width]
    red = np.where((x - width * 0.6) ** 2 + (y - height * 0.45) ** 2 < (min(width, height) * 0.2) ** 2, 230, 30)
    green = (x * 255 // max(width - 1, 1)).astype(np.int64)
    blue = (y * 255 // max(height - 1, 1)).astype(np.int64)
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8))


class TimingStreamer(TextStreamer):
    """Prints the answer as it is generated (unless `echo=False`) and records when each generated token arrived."""

    def __init__(self, tokenizer, echo=True):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.echo = echo
        self.start = time.perf_counter()
        self.token_times = []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.token_times.append(time.perf_counter())
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        if self.echo:
            super().on_finalized_text(text, stream_end)


def say(line):
    """One line of what the demo is doing, printed at once."""
    print(line, flush=True)


def describe_visual_budget(config, input_ids):
    """Print what an image costs the language model: packed visual tokens (TokenPacker) or none (VLoRA)."""
    grid = config.vision_config.image_size // config.vision_config.patch_size
    image_tokens = int((input_ids == config.image_token_id).sum())
    if config.model_type == "vlora":
        say(f"visual tokens per image: {grid * grid} patches -> 0 (one masked placeholder position); the image "
            f"becomes rank-{config.lora_rank} deltas on {config.delta_targets} of {len(config.patched_layers)} of "
            f"{config.text_config.num_hidden_layers} layers")
        say(f"prompt tokens: {input_ids.shape[1]}, of which {image_tokens} image placeholder")
        return
    say(f"visual tokens per image: {grid * grid} patches -> {config.image_seq_length} packed "
        f"({1 - config.image_seq_length / (grid * grid):.0%} fewer, {config.projector_type}, scale {config.scale_factor})")
    say(f"prompt tokens: {input_ids.shape[1]}, of which {image_tokens} image tokens")


def load(model_path, quantization=None):
    """The model (remote code allowed; bf16 on a GPU, 4/8-bit with `quantization`) and its processor."""
    load_kwargs = {"trust_remote_code": True}
    if torch.cuda.is_available():
        load_kwargs.update(device_map="auto", **{DTYPE_KWARG: torch.bfloat16})
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        # The model's default skip list keeps the vision tower, the projector and lm_head unquantized.
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit",
            load_in_8bit=quantization == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    say(f"loading {model_path} with trust_remote_code=True ...")
    model = AutoModelForImageTextToText.from_pretrained(model_path, **load_kwargs).eval()
    return model, AutoProcessor.from_pretrained(model_path, trust_remote_code=True)


def image_prompt(processor, prompt):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def chat(model_path, image_path, prompt, max_new_tokens=32, quantization=None, random_weights=False):
    """Load a checkpoint (remote code allowed), answer `prompt` about the image, print timings; returns the text."""
    model, processor = load(model_path, quantization)
    inputs = processor(images=[image_path], text=[image_prompt(processor, prompt)], return_tensors="pt").to(model.device)
    say(f"model class:  {type(model).__module__}.{type(model).__name__}")
    describe_visual_budget(model.config, inputs["input_ids"])
    if random_weights:
        say("note: this checkpoint has random weights, so the answer below is nonsense; it shows the pipeline works")
    say(f"generating up to {max_new_tokens} tokens (greedy) ...")
    streamer = TimingStreamer(processor.tokenizer)
    print("answer: ", end="", flush=True)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
    times = streamer.token_times
    prefill = times[0] - start if times else float("nan")
    decode_rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    say(f"prefill (vision tower + projector + LM over the prompt): {prefill * 1000:.1f} ms")
    say(f"decode: {len(times)} tokens, {decode_rate:.1f} tokens/s")
    return answer


def answer_quiz(model_path, quiz_path, answers_path, max_new_tokens=4, quantization=None):
    """Answer every question of a quiz file (`[{"image", "question", ...}]`, written by `demo_quiz.write_quiz`) one
    at a time, greedily, print the token counts and timings, and write the answers (a JSON list) to `answers_path`."""
    model, processor = load(model_path, quantization)
    quiz = json.loads(open(quiz_path).read())
    say(f"model class:  {type(model).__module__}.{type(model).__name__}")
    answers, prefill, decode = [], [], []
    for number, item in enumerate(quiz):
        inputs = processor(images=[item["image"]], text=[image_prompt(processor, item["question"])],
                           return_tensors="pt").to(model.device)
        if number == 0:
            describe_visual_budget(model.config, inputs["input_ids"])
            say(f"answering {len(quiz)} questions, one at a time (greedy, up to {max_new_tokens} tokens) ...")
        streamer = TimingStreamer(processor.tokenizer, echo=False)  # the parent prints the answers
        start = time.perf_counter()
        with torch.inference_mode():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)
        times = streamer.token_times
        prefill.append(times[0] - start)
        decode.extend(b - a for a, b in zip(times, times[1:]))
        answers.append(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    say(f"prefill (vision tower + projector + LM over the prompt): median {statistics.median(prefill) * 1000:.1f} ms "
        f"over {len(prefill)} questions")
    if decode:
        say(f"decode: {1 / statistics.median(decode):.1f} tokens/s (median)")
    with open(answers_path + ".tmp", "w") as handle:
        json.dump(answers, handle)
    os.replace(answers_path + ".tmp", answers_path)
    return answers


def build_demo_checkpoint(output_dir):
    """Build, save and return the path of the tiny random checkpoint (model, processor, remote code)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    processor = build_tiny_processor(tokenizer, model.config.image_seq_length)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def run_tiny_demo(workdir, max_new_tokens, family="tokenpacker"):
    workdir = os.path.abspath(workdir)
    checkpoint = os.path.join(workdir, f"tiny_{family}")
    start = time.perf_counter()
    if family == "vlora":
        from .demo_vlora import build_vlora_demo_checkpoint

        say("building a tiny VLoRA (CLIP-shaped tower with the real 24 x 24 grid, perceptual weights generator, "
            "tiny LLaMA), random weights ...")
        build_vlora_demo_checkpoint(checkpoint)
    else:
        say("building a tiny TokenPacker (CLIP-shaped tower with the real 24 x 24 grid, tiny LLaMA), random "
            "weights ...")
        build_demo_checkpoint(checkpoint)
    say(f"checkpoint: {checkpoint} (built and saved with its remote code in {time.perf_counter() - start:.1f} s, "
        "random weights)")
    image_path = os.path.join(workdir, "synthesized.png")
    synthesize_image().save(image_path)
    say(f"image: {image_path} (synthesized)")
    say("reloading it in a fresh Python process that cannot import this package ...")
    # A fresh interpreter that never imports this package: the checkpoint's own remote code must carry it.
    command = [sys.executable, os.path.abspath(__file__), "--model", checkpoint, "--image", image_path,
               "--prompt", "What is in the image?", "--max-new-tokens", str(max_new_tokens), "--random-weights"]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run(command, env=env, cwd=workdir).returncode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hub id (None: the embedded shapes-task model's quiz, or "
                                         "with --random-weights a tiny random checkpoint)")
    parser.add_argument("--image", help="image to ask about: a file, a file:// or http(s) URL")
    parser.add_argument("--prompt", default="What is in the image?", help="question about the image")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="tokens to generate at most")
    parser.add_argument("--output-dir", help="folder for the demo's checkpoint and images (None: a temporary folder)")
    parser.add_argument("--questions", type=int, default=10, help="questions in the embedded model's quiz")
    parser.add_argument("--seed", type=int, help="seed of the quiz's pictures (None: new ones each run)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build a tiny random checkpoint instead of the embedded trained one: a smoke run whose "
                             "answer is nonsense")
    parser.add_argument("--family", choices=("tokenpacker", "vlora"), default="tokenpacker",
                        help="model family of the random checkpoint (vlora implies --random-weights)")
    parser.add_argument("--quiz", help=argparse.SUPPRESS)  # the fresh process's side of the quiz
    parser.add_argument("--answers", help=argparse.SUPPRESS)
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", help="quantize the language model to 4 bits (bitsandbytes)")
    quant.add_argument("--load-in-8bit", action="store_true", help="quantize the language model to 8 bits (bitsandbytes)")
    args = parser.parse_args(argv)
    quantization = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None

    if args.model and args.quiz:
        answer_quiz(args.model, args.quiz, args.answers, args.max_new_tokens, quantization)
        return 0
    if args.model:
        if not args.image:
            parser.error("--model needs --image FILE")
        if "://" not in args.image and not os.path.isfile(args.image):
            parser.error(f"--image {args.image}: no such file")
        answer = chat(args.model, args.image, args.prompt, args.max_new_tokens, quantization, args.random_weights)
        say(f"generated text: {answer!r}")
        return 0
    if args.questions < 1:
        parser.error(f"--questions must be at least 1; got {args.questions}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        return run_demo(os.path.abspath(args.output_dir), args)
    with tempfile.TemporaryDirectory(prefix="tokenpacker_demo_") as workdir:
        return run_demo(workdir, args)


def run_demo(workdir, args):
    if args.random_weights or args.family == "vlora":
        return run_tiny_demo(workdir, args.max_new_tokens, args.family)
    from modeling_tokenpacker.demo_quiz import run_quiz  # absolute: this file also runs as a script, the quiz's child

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(3), "little")
    return run_quiz(workdir, args.questions, seed, say=say)


if __name__ == "__main__":
    sys.exit(main())

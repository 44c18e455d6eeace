"""Bad and unusual inputs for the image processor, the processor and the model, counted by outcome.

    python benchmarks/input_fuzz.py                  # a few thousand inputs, about a minute on 2 cores
    python benchmarks/input_fuzz.py --limit 300      # a sample, seconds

Every input is generated deterministically (sizes x PIL modes x array layouts and dtypes x odd values for images;
text, image nesting and tokenizer arguments for the processor; pixel values, ids, labels and masks for the model) and
sorted into one outcome:
- `ok`: it worked, and what came back is right (finite pixel values of the documented shape; as many image tokens
  as the model scatters features; padding, truncation and special tokens as asked; finite logits);
- `clear error`: a ValueError or TypeError raised by this package's own code, saying what was expected;
- `crash`: any other exception, or a ValueError/TypeError from deep inside PIL, numpy, torch or transformers;
- `wrong result`: it returned, but what came back breaks the rule it should follow (e.g. a 2-channel array taken as
  an image, NaN pixels, a prompt silently not padded), it returned where the input must be refused, or it refused
  an input that must work (an image file's path, `images=` without text).
Writes input_fuzz.json (counts per group and outcome, and the failing cases) to benchmarks/results/ (or
--output-dir); run it on two commits to compare.
"""

import argparse
import base64
import io
import json
import os
import random
import sys
import tempfile
import traceback

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402

bench_utils.add_repo_to_path()
from modeling_tokenpacker import TokenPackerImageProcessor  # noqa: E402
from modeling_tokenpacker.demo import build_tiny_model, build_tiny_processor, build_tiny_tokenizer  # noqa: E402

OURS = os.path.join("modeling_tokenpacker", "")
PROMPT = "USER: <image>\nWhat is it? ASSISTANT:"
PIL_MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa", "La",
             "I;16", "I;16L", "I;16B", "I;16N"]
SIDES = [1, 2, 3, 5, 17, 100, 335, 336, 337, 700, 1500]


class Case:
    """One input: `run()` returns what came back; `check(result)` says whether it is right (True), or why not;
    `must_refuse` marks inputs that have to end in a clear error; every other input must work."""

    def __init__(self, group, name, run, check=lambda result: True, must_refuse=False):
        self.group, self.name, self.run, self.check, self.must_refuse = group, name, run, check, must_refuse


def raised_by_us(error):
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and OURS in frames[-1].filename


def outcome(case):
    try:
        result = case.run()
    except (ValueError, TypeError) as error:
        if not raised_by_us(error):
            return "crash", f"{type(error).__name__}: {error}"[:200]
        if not case.must_refuse:
            return "wrong result", f"refused a valid input: {error}"[:200]
        return "clear error", None
    except Exception as error:  # noqa: BLE001 - anything else is what this counts
        return "crash", f"{type(error).__name__}: {error}"[:200]
    if case.must_refuse:
        return "wrong result", "accepted an input that must be refused"
    verdict = case.check(result)
    return ("ok", None) if verdict is True else ("wrong result", str(verdict)[:200])


def finite_pixels(count=None, blocks=None):
    def check(result):
        pixels = torch.as_tensor(np.asarray(result["pixel_values"]))
        if not torch.isfinite(pixels).all():
            return "non-finite pixel values"
        if pixels.ndim != 4 or pixels.shape[1:] != (3, 336, 336) or pixels.dtype != torch.float32:
            return f"pixel_values {tuple(pixels.shape)} {pixels.dtype}"
        if count is not None and blocks is None and pixels.shape[0] != count:
            return f"{pixels.shape[0]} images for {count} inputs"
        return True
    return check


def random_image(rng, mode, width, height):
    array = np.asarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    image = Image.fromarray(array, "RGB")
    try:
        return image.convert(mode)
    except ValueError:
        return Image.new(mode, (width, height))


def image_cases(rng, folder):
    cases = []
    for mode in ("pad", "square", "slice"):
        processor = TokenPackerImageProcessor(image_aspect_ratio=mode)
        for pil_mode in PIL_MODES:
            for width, height in [(37, 23), (1, 1), (336, 1), (3, 700)]:
                image = random_image(rng, pil_mode, width, height)
                # mode F made from 8-bit data holds 0..255, outside the [0, 1] of float images
                cases.append(Case("image: PIL modes", f"{mode} {pil_mode} {width}x{height}",
                                  lambda p=processor, i=image: p(i, return_tensors="pt"),
                                  finite_pixels(None if mode == "slice" else 1), must_refuse=pil_mode == "F"))
        for width in SIDES:
            for height in SIDES:
                image = random_image(rng, "RGB", width, height)
                cases.append(Case("image: sizes", f"{mode} {width}x{height}",
                                  lambda p=processor, i=image: p(i, return_tensors="pt"),
                                  finite_pixels(None if mode == "slice" else 1)))
    processor = TokenPackerImageProcessor()
    for library in ("numpy", "torch"):
        for layout in ("HWC", "CHW", "HW", "NHWC", "NCHW"):
            for channels in (1, 2, 3, 4, 5):
                for dtype in ("uint8", "uint16", "int32", "int64", "float32", "float64", "float16", "bool",
                              "complex64", "bfloat16"):
                    for values in ("normal", "out of range", "nan", "inf"):
                        case = array_case(rng, processor, library, layout, channels, dtype, values)
                        if case is not None:
                            cases.append(case)
    cases += file_cases(rng, processor, folder)
    return cases


def array_case(rng, processor, library, layout, channels, dtype, values):
    height, width = 9, 11
    shape = {"HWC": (height, width, channels), "CHW": (channels, height, width), "HW": (height, width),
             "NHWC": (2, height, width, channels), "NCHW": (2, channels, height, width)}[layout]
    floating = dtype.startswith(("float", "bfloat"))
    base = rng.random(shape) if floating else rng.integers(0, 2 if dtype == "bool" else 256, size=shape)
    if values == "out of range":
        base = base * 1000 + (2 if floating else 300)
    array = np.asarray(base, dtype=np.float64)
    if values in ("nan", "inf") and floating:
        array.flat[0] = np.nan if values == "nan" else np.inf
    if library == "torch":
        torch_dtype = {"complex64": torch.complex64, "bool": torch.bool, "bfloat16": torch.bfloat16}.get(
            dtype, getattr(torch, dtype, None))
        data = torch.tensor(array).to(torch_dtype) if dtype != "uint16" else torch.tensor(array.astype(np.int64)).to(
            torch.uint16)
    else:
        if dtype == "bfloat16":
            return None  # numpy has no bfloat16
        data = array.astype(dtype)
    bad_channels = layout != "HW" and channels not in (1, 3, 4)
    bad_values = values in ("nan", "inf") and floating
    bad_values |= values == "out of range" and dtype not in ("uint8", "uint16", "bool")  # those wrap, in range
    bad_values |= dtype == "complex64"
    images = 2 if layout.startswith("N") else 1
    name = f"{library} {layout} C={channels} {dtype} {values}"
    return Case("image: arrays", name, lambda: processor(data, return_tensors="pt"), finite_pixels(images),
                must_refuse=bad_channels or bad_values)


def file_cases(rng, processor, folder):
    good = os.path.join(folder, "good.png")
    random_image(rng, "RGB", 40, 30).save(good)
    truncated = os.path.join(folder, "truncated.jpg")
    buffer = io.BytesIO()
    random_image(rng, "RGB", 64, 48).save(buffer, "JPEG")
    with open(truncated, "wb") as handle:
        handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text_file = os.path.join(folder, "notes.txt")
    with open(text_file, "w") as handle:
        handle.write("not an image")
    closed = Image.open(good)
    closed.load()
    closed.close()
    encoded = base64.b64encode(open(good, "rb").read()).decode()
    animated = os.path.join(folder, "animated.gif")
    frames = [random_image(rng, "P", 20, 20) for _ in range(3)]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    cases = [
        Case("image: files", "path", lambda: processor(good, return_tensors="pt"), finite_pixels(1)),
        Case("image: files", "file:// URL", lambda: processor("file://" + good, return_tensors="pt"), finite_pixels(1)),
        Case("image: files", "data URI", lambda: processor("data:image/png;base64," + encoded, return_tensors="pt"),
             finite_pixels(1)),
        Case("image: files", "animated GIF", lambda: processor(animated, return_tensors="pt"), finite_pixels(1)),
        Case("image: files", "missing path", lambda: processor(os.path.join(folder, "missing.png")), must_refuse=True),
        Case("image: files", "truncated JPEG", lambda: processor(truncated, return_tensors="pt"), must_refuse=True),
        Case("image: files", "not an image", lambda: processor(text_file), must_refuse=True),
        Case("image: files", "closed image", lambda: processor(closed), must_refuse=True),
        Case("image: files", "None", lambda: processor(None), must_refuse=True),
        Case("image: files", "int", lambda: processor(5), must_refuse=True),
        Case("image: files", "dict", lambda: processor({"image": 1}), must_refuse=True),
        Case("image: files", "empty list", lambda: processor([]), must_refuse=True),
    ]
    return cases


def token_count_check(processor, images_per_prompt):
    def check(result):
        ids = torch.as_tensor(result["input_ids"])
        image_tokens = int((ids == processor.image_token_id).sum())
        expected = processor.image_seq_length * sum(images_per_prompt)
        return True if image_tokens == expected else f"{image_tokens} image tokens, expected {expected}"
    return check


def processor_cases(rng, processor, image):
    cases = []
    texts = {"str": PROMPT, "list": [PROMPT, PROMPT], "empty list": [], "int": 123, "dict": {"text": PROMPT},
             "image": image, "nested": [[PROMPT]], "None": None, "bytes": PROMPT.encode()}
    for name, text in texts.items():
        count = {"str": 1, "list": 2}.get(name)
        images = None if count is None else [image] * count
        cases.append(Case("processor: text", name, lambda t=text, i=images: processor(images=i, text=t),
                          token_count_check(processor, [1] * (count or 0)), must_refuse=count is None))
    for n_prompts in (1, 2, 3):
        for per_prompt in ([1] * n_prompts, [0] + [1] * (n_prompts - 1), [2] * n_prompts):
            prompts = ["USER: " + "<image>\n" * count + "Hi ASSISTANT:" for count in per_prompt]
            for nesting in ("flat", "nested", "nested wrong"):
                if nesting == "flat":
                    images = [image] * sum(per_prompt)
                elif nesting == "nested":
                    images = [[image] * count for count in per_prompt]
                else:
                    images = [[image] * (count + 1) for count in per_prompt]
                cases.append(Case("processor: images", f"{per_prompt} {nesting}",
                                  lambda p=prompts, i=images: processor(images=i, text=p, padding=True),
                                  token_count_check(processor, per_prompt), must_refuse=nesting == "nested wrong"))
    base = len(processor(images=[image], text=PROMPT)["input_ids"][0])
    for max_length in (10, base - 1, base, base + 5):
        cases.append(Case("processor: arguments", f"truncation max_length={max_length}",
                          lambda m=max_length: processor(images=[image], text=PROMPT, truncation=True, max_length=m),
                          lambda r, m=max_length: len(r["input_ids"][0]) <= m or f"{len(r['input_ids'][0])} > {m}",
                          must_refuse=max_length < base - 20))
    for length in (base + 7, base + 40):
        cases.append(Case("processor: arguments", f"padding=max_length {length}",
                          lambda n=length: processor(images=[image], text=PROMPT, padding="max_length", max_length=n),
                          lambda r, n=length: len(r["input_ids"][0]) == n or f"length {len(r['input_ids'][0])} != {n}"))
    bos = processor.tokenizer.bos_token_id
    cases.append(Case("processor: arguments", "add_special_tokens=False",
                      lambda: processor(images=[image], text=PROMPT, add_special_tokens=False),
                      lambda r: r["input_ids"][0][0] != bos or "BOS kept"))
    cases.append(Case("processor: arguments", "images without text", lambda: processor(images=[image]),
                      lambda r: "pixel_values" in r or "no pixel values"))
    cases.append(Case("processor: arguments", "empty messages",
                      lambda: processor.apply_chat_template([], add_generation_prompt=True), must_refuse=True))
    return cases


def model_cases(rng, model, processor, image):
    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    vocab = model.config.text_config.vocab_size

    def forward(**kwargs):
        with torch.no_grad():
            return model(**kwargs)

    def finite_logits(result):
        return True if torch.isfinite(result.logits).all() else "non-finite logits"

    cases = []
    pixel_variants = {
        "float32": (pixels, False), "numpy": (pixels.numpy(), True), "list": (pixels.tolist(), True),
        "uint8": (pixels.to(torch.uint8), True), "int64": (pixels.to(torch.int64), True),
        "bool": (pixels > 0, True), "complex": (pixels.to(torch.complex64), True),
        "1 channel": (pixels[:, :1], True), "4 channels": (torch.cat([pixels, pixels[:, :1]], 1), True),
        "nan": (pixels.clone().index_fill_(0, torch.tensor([0]), float("nan")), True),
        "inf": (pixels.clone().index_fill_(0, torch.tensor([0]), float("inf")), True),
        "empty batch": (pixels[:0], True), "wrong size": (pixels[:, :, :224, :224], True),
        "3-D": (pixels[0], True), "bfloat16": (pixels.to(torch.bfloat16), False),
    }
    for name, (value, refuse) in pixel_variants.items():
        cases.append(Case("model: pixel_values", name,
                          lambda v=value: forward(input_ids=ids, attention_mask=mask, pixel_values=v),
                          finite_logits, must_refuse=refuse))
    id_variants = {
        "out of vocabulary": ids.clone().index_fill_(1, torch.tensor([1]), vocab + 5),
        "negative": ids.clone().index_fill_(1, torch.tensor([1]), -3), "float": ids.float(), "1-D": ids[0],
    }
    for name, value in id_variants.items():
        cases.append(Case("model: input_ids", name,
                          lambda v=value: forward(input_ids=v, attention_mask=mask, pixel_values=pixels),
                          finite_logits, must_refuse=True))
    cases.append(Case("model: input_ids", "image tokens without pixel values",
                      lambda: forward(input_ids=ids, attention_mask=mask), finite_logits, must_refuse=True))
    cases.append(Case("model: labels", "labels of another length",
                      lambda: forward(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids[:, :-3]),
                      must_refuse=True))
    cases.append(Case("model: attention_mask", "shorter than the ids",
                      lambda: forward(input_ids=ids, attention_mask=mask[:, :-4], pixel_values=pixels),
                      must_refuse=True))
    cases.append(Case("model: pixel_values", "as the processor gives them",
                      lambda: forward(**inputs), finite_logits))
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, help="run only this many inputs (an even sample of all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=bench_utils.RESULTS_DIR)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer)
    processor = build_tiny_processor(tokenizer, model.config.image_seq_length)
    image = random_image(rng, "RGB", 64, 48)
    with tempfile.TemporaryDirectory() as folder:
        cases = image_cases(rng, folder) + processor_cases(rng, processor, image) + \
            model_cases(rng, model, processor, image)
        if args.limit:
            cases = random.Random(args.seed).sample(cases, min(args.limit, len(cases)))
        results = {}
        failures = []
        for case in cases:
            kind, detail = outcome(case)
            results.setdefault(case.group, {}).setdefault(kind, 0)
            results[case.group][kind] += 1
            if kind in ("crash", "wrong result"):
                failures.append({"group": case.group, "input": case.name, "outcome": kind, "detail": detail})
    totals = {}
    for counts in results.values():
        for kind, number in counts.items():
            totals[kind] = totals.get(kind, 0) + number
    print(f"{len(cases)} inputs: " + ", ".join(f"{totals.get(k, 0)} {k}" for k in
                                                ("ok", "clear error", "crash", "wrong result")))
    for group in sorted(results):
        counts = results[group]
        print(f"  {group:28s} " + ", ".join(f"{counts.get(k, 0)} {k}" for k in
                                             ("ok", "clear error", "crash", "wrong result")))
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "input_fuzz.json")
    with open(path, "w") as handle:
        json.dump({"inputs": len(cases), "totals": totals, "groups": results, "failures": failures}, handle, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

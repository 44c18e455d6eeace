"""Memory footprint and decode speed of bitsandbytes 4-bit / 8-bit TokenPacker vs bf16, measured in one run.

    python benchmarks/quantization.py            # CPU-sized model (LLM 1024 wide, 8 layers, 32k vocab)
    python benchmarks/quantization.py --quick    # toy size, seconds

Random weights (footprint and speed do not depend on the values). The vision tower, projector and lm_head stay in
the compute dtype by default; one row quantizes the vision tower too. Writes benchmarks/results/quantization.csv.
"""

import argparse
import csv
import os
import platform
import sys
import tempfile
import time

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_tokenpacker import TokenPackerForConditionalGeneration  # noqa: E402
from modeling_tokenpacker.demo import build_tiny_processor, build_tiny_tokenizer, synthesize_image  # noqa: E402
from modeling_tokenpacker.modeling_tokenpacker import MODULES_NOT_TO_QUANTIZE  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_model(tokenizer, quick):
    from modeling_tokenpacker import TokenPackerConfig

    width, layers, vocab = (128, 2, 640) if quick else (1024, 8, 32064)
    config = TokenPackerConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64 if quick else 256,
                       "intermediate_size": 128 if quick else 1024, "num_hidden_layers": 24,
                       "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
        text_config={"model_type": "llama", "hidden_size": width, "intermediate_size": -(-width * 11 // 4 // 64) * 64,
                     "num_hidden_layers": layers, "num_attention_heads": width // 64, "vocab_size": vocab,
                     "pad_token_id": tokenizer.pad_token_id},
        projector_hidden_size=256 if not quick else 64, projector_num_heads=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    return TokenPackerForConditionalGeneration(config).eval()


def variants():
    from transformers import BitsAndBytesConfig

    no_vision_skip = [name for name in MODULES_NOT_TO_QUANTIZE if "vision_tower" not in name]
    return [
        ("bf16", None),
        ("8-bit (int8)", BitsAndBytesConfig(load_in_8bit=True)),
        ("4-bit nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.bfloat16)),
        ("4-bit nf4 + double quant", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_use_double_quant=True,
                                                        bnb_4bit_compute_dtype=torch.bfloat16)),
        ("4-bit nf4, vision tower too", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16,
                                                           llm_int8_skip_modules=no_vision_skip)),
    ]


def decode_rate(model, inputs, new_tokens):
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return new_tokens / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy size")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--output-dir", default=RESULTS)
    args = parser.parse_args(argv)
    dtype_kwarg = "dtype" if hasattr(transformers, "__version__") and int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"

    tokenizer = build_tiny_tokenizer()
    model = build_model(tokenizer, args.quick)
    processor = build_tiny_processor(tokenizer, model.config.image_seq_length)
    inputs = processor(images=[synthesize_image()], text=["USER: <image>\nWhat is in the image? ASSISTANT:"],
                       return_tensors="pt")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = os.path.join(folder, "ckpt")
        model.save_pretrained(checkpoint)
        del model
        for name, quantization_config in variants():
            kwargs = {dtype_kwarg: torch.bfloat16}
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            loaded = TokenPackerForConditionalGeneration.from_pretrained(checkpoint, **kwargs).eval()
            footprint = loaded.get_memory_footprint()
            rows.append({"variant": name, "footprint_bytes": footprint,
                         "decode_tokens_per_s": round(decode_rate(loaded, inputs, args.new_tokens), 2)})
            del loaded
    base = rows[0]["footprint_bytes"]
    for row in rows:
        row["footprint_ratio_vs_bf16"] = round(row["footprint_bytes"] / base, 4)

    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "quantization_quick.csv" if args.quick else "quantization.csv")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}"
    with open(path, "w", newline="") as handle:
        handle.write(f"# {machine}\n")
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"machine: {machine}")
    print(f"{'variant':30s} {'footprint MB':>13s} {'ratio vs bf16':>14s} {'decode tok/s':>13s}")
    for row in rows:
        print(f"{row['variant']:30s} {row['footprint_bytes'] / 2**20:13.1f} {row['footprint_ratio_vs_bf16']:14.3f} "
              f"{row['decode_tokens_per_s']:13.1f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

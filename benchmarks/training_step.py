"""One training step (forward, backward, AdamW step) of the 576-token baseline against TokenPacker s=2/3/4 with the
same vision tower and language model, with and without gradient checkpointing: time per step, tokens per second
and peak memory.

    python benchmarks/training_step.py [--size cpu|7b] [--batch-size 4] [--repeats 5] [--device cuda --dtype bfloat16]

Each variant and checkpointing setting runs in a process of its own, so the peak resident memory (CPU; peak
allocated memory on a GPU) is that run's alone. The batch comes from the training pipeline itself (ExampleBuilder,
TokenPackerDataCollator; vicuna_v1 labels, one image per sample), the stage is `finetune` with the vision tower
frozen. Tokens per second counts the batch's sequence tokens (text and image positions, padding excluded). Writes
training_step.csv and .json to benchmarks/results/.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_utils  # noqa: E402

bench_utils.add_repo_to_path()
sys.path.insert(0, os.path.join(bench_utils.REPO_ROOT, "tests"))

VARIANTS = {"mlp2x_gelu": None, "tokenpacker_s2": 2, "tokenpacker_s3": 3, "tokenpacker_s4": 4}
SIZES = bench_utils.SMALL_LM_SIZES
REPLY = "The picture shows a red circle on a background that fades from green on the left to blue at the bottom."


def measure(args, name, checkpointing):
    """One variant in this process: the batch, warm-up, timed steps; prints one JSON line."""
    from end_to_end import build_config

    from llama_processor import make_processor, sentencepiece_tokenizer
    from modeling_tokenpacker import TokenPackerForConditionalGeneration
    from modeling_tokenpacker.demo import synthesize_image
    from modeling_tokenpacker.training import ExampleBuilder, TokenPackerDataCollator

    device, dtype = torch.device(args.device), bench_utils.DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = sentencepiece_tokenizer()
    dims = json.loads(json.dumps(SIZES[args.size]))
    dims["text"]["vocab_size"] = len(tokenizer)
    scale_factor = VARIANTS[name]
    torch.manual_seed(0)  # random weights; only the projector differs between the variants
    config = build_config(dims, tokenizer, "mlp2x_gelu" if scale_factor is None else "tokenpacker", scale_factor or 2)
    model = TokenPackerForConditionalGeneration(config).to(device=device, dtype=dtype).train()
    model.model.vision_tower.requires_grad_(False)
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    processor = make_processor(tokenizer, "pad", config.image_seq_length)
    builder = ExampleBuilder(processor, model_max_length=4096)
    rows = [{"id": index, "images": [synthesize_image(300 + 20 * index, 240)], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
        {"role": "assistant", "content": REPLY}]} for index in range(args.batch_size)]
    batch = TokenPackerDataCollator.from_processor(processor)([builder(row, i) for i, row in enumerate(rows)])
    batch = {key: value.to(device) for key, value in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sync = bench_utils.synchronizer(device)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"variant": name, "gradient_checkpointing": checkpointing,
                      "image_tokens": config.image_seq_length, "batch_size": args.batch_size,
                      "tokens_per_step": tokens, "step_ms": round(1000 * statistics.median(times), 1),
                      "tokens_per_s": round(tokens / statistics.median(times), 1),
                      "peak_memory_mib": round(peak / 2**20, 1),
                      "peak_memory_kind": "cuda max allocated" if device.type == "cuda" else "process max RSS"}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(bench_utils.DTYPES))
    parser.add_argument("--output-dir", default=bench_utils.RESULTS_DIR)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bench_utils.check_device(torch.device(args.device))
    if args.variant:
        return measure(args, args.variant, args.checkpointing)
    rows = []
    own = [arg for arg in (argv if argv is not None else sys.argv[1:])]
    for name in VARIANTS:
        for checkpointing in (False, True):
            command = [sys.executable, os.path.abspath(__file__), *own, "--variant", name]
            if checkpointing:
                command.append("--checkpointing")
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    baseline = {row["gradient_checkpointing"]: row for row in rows if row["variant"] == "mlp2x_gelu"}
    for row in rows:
        base = baseline[row["gradient_checkpointing"]]
        row["speedup_vs_mlp2x"] = round(base["step_ms"] / row["step_ms"], 2)
        row["memory_vs_mlp2x"] = round(row["peak_memory_mib"] / base["peak_memory_mib"], 2)
    os.makedirs(args.output_dir, exist_ok=True)
    bench_utils.write_csv(os.path.join(args.output_dir, "training_step.csv"), rows)
    bench_utils.write_json(os.path.join(args.output_dir, "training_step.json"),
                           {"machine": bench_utils.machine_info(args.device), "size": args.size,
                            "dims": SIZES[args.size], "batch_size": args.batch_size, "rows": rows})
    print("| variant | image tokens | grad. checkpointing | tokens/step | step ms | tokens/s | speed-up | peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['image_tokens']} | {row['gradient_checkpointing']} | "
              f"{row['tokens_per_step']} | {row['step_ms']} | {row['tokens_per_s']} | {row['speedup_vs_mlp2x']}× | "
              f"{row['peak_memory_mib']} |")


if __name__ == "__main__":
    main()

"""Bounded-memory conversion: peak RSS and throughput of the converter on a synthetic original checkpoint.

    python benchmarks/conversion.py            # >= 2 GB source: sharded fp16 pytorch_model-*.bin + index
    python benchmarks/conversion.py --quick    # a few hundred MB, seconds

Builds an original-format TokenPacker checkpoint (LLaMA-shaped language model, TokenPacker projector, CLIP-L-shaped
tower embedded as a raw training save has it) in `--shard-size` shards. Then, for a cold page cache (when this
process may drop caches, i.e. as root on Linux) and a warm one, in the same run:
  1. a plain sequential read of the same files (the I/O limit);
  2. the converter in a fresh child process (`verify=False`): its tensor-streaming time (read, map, write), its
     end-to-end wall time (interpreter, imports, tokenizer and side files included), and its peak RSS (the
     child's own VmHWM, sampled from /proc).
Prints peak RSS next to the largest source shard (target: <= largest shard + 1 GB) and the streaming throughput as
a ratio of the plain read's (target: >= 50 %), with the end-to-end ratio beside it. Writes
benchmarks/results/conversion.csv and .json.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from bench_utils import (RESULTS_DIR, REPO_ROOT, add_repo_to_path, describe_machine, machine_info, output_paths,
                         print_table, write_csv, write_json)

add_repo_to_path()

GB = 10**9
READ_CHUNK = 64 * 2**20


def original_config(text, scale_factor=2):
    return {
        "model_type": "llava", "architectures": ["LlavaLlamaForCausalLM"], "torch_dtype": "float16",
        "hidden_size": text["hidden_size"], "intermediate_size": text["intermediate_size"],
        "num_hidden_layers": text["num_hidden_layers"], "num_attention_heads": text["num_attention_heads"],
        "num_key_value_heads": text["num_attention_heads"], "vocab_size": text["vocab_size"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": 0, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": 1024, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_projector_type": "tokenpacker", "scale_factor": scale_factor, "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False,
    }


def llama_shapes(text):
    h, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(text["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[prefix + f"self_attn.{name}.weight"] = (h, h)
        shapes[prefix + "mlp.gate_proj.weight"] = (inter, h)
        shapes[prefix + "mlp.up_proj.weight"] = (inter, h)
        shapes[prefix + "mlp.down_proj.weight"] = (h, inter)
        shapes[prefix + "input_layernorm.weight"] = (h,)
        shapes[prefix + "post_attention_layernorm.weight"] = (h,)
    return shapes


def projector_shapes(hidden):
    e, c = 1024, 1024
    shapes = {"q_proj_1.weight": (e, c), "k_proj_1.0.weight": (e, 4 * c), "k_proj_1.0.bias": (e,),
              "k_proj_1.2.weight": (e, e), "k_proj_1.2.bias": (e,), "v_proj_1.0.weight": (e, 4 * c),
              "v_proj_1.0.bias": (e,), "v_proj_1.2.weight": (e, e), "v_proj_1.2.bias": (e,),
              "clip_attn.in_proj_weight": (3 * e, e), "clip_attn.in_proj_bias": (3 * e,),
              "clip_attn.out_proj.weight": (e, e), "clip_attn.out_proj.bias": (e,), "mlp.0.weight": (hidden, e),
              "mlp.0.bias": (hidden,), "mlp.2.weight": (hidden, hidden), "mlp.2.bias": (hidden,)}
    for norm in ("ln_q_1", "ln_k_1", "ln_v_1"):
        shapes[f"{norm}.weight"] = (e,)
        shapes[f"{norm}.bias"] = (e,)
    return {"model.mm_projector." + name: shape for name, shape in shapes.items()}


def clip_shapes(intermediate):
    """CLIP ViT-L/14-336 vision tower names and shapes (24 layers of width 1024), as a raw training save embeds it."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=intermediate, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    with torch.device("meta"):
        tower = CLIPVisionModel(config)
    inner = getattr(tower, "vision_model", tower)
    return {"model.vision_tower.vision_tower.vision_model." + name: tuple(p.shape) for name, p in inner.state_dict().items()}


def build_source(folder, text, clip_intermediate, shard_bytes, tokenizer_dir):
    """Write the synthetic checkpoint in fp16 shards + index, one shard in memory at a time; returns (total bytes,
    largest shard bytes)."""
    os.makedirs(folder)
    shapes = {**llama_shapes(text), **projector_shapes(text["hidden_size"]), **clip_shapes(clip_intermediate)}
    groups, current, used = [], [], 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        if current and used + size > shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    groups.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for i, names in enumerate(groups, start=1):
        file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        shard = {name: (torch.rand(shapes[name], generator=generator) - 0.5).to(torch.float16) for name in names}
        torch.save(shard, os.path.join(folder, file))
        del shard
        sizes.append(os.path.getsize(os.path.join(folder, file)))
        weight_map.update({name: file for name in names})
    with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as handle:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, handle)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(original_config(text), handle)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return sum(sizes), max(sizes)


def drop_page_cache():
    """Empty the page cache (Linux, root); False when this process may not."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def plain_read(folder):
    """Seconds to read every weight file sequentially (the converter's reading is bounded by this)."""
    start = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".bin"):
            with open(os.path.join(folder, name), "rb", buffering=0) as handle:
                while handle.read(READ_CHUNK):
                    pass
    return time.perf_counter() - start


CHILD = """
import json, sys, time
start = time.perf_counter()
sys.path.insert(0, sys.argv[1])
from conversion.convert_tokenpacker_to_hf import convert
result = convert(sys.argv[3], input=sys.argv[2], dtype="float16", max_shard_size=sys.argv[4], verify=False,
                 progress=False)
print(json.dumps({"weights_seconds": result.weights_seconds, "bytes_written": result.bytes_written,
                  "in_process_seconds": time.perf_counter() - start}))
"""


def child_peak_rss(pid):
    """The child's VmHWM (peak RSS of its own address space, so not the pre-exec fork), in bytes; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_converter(source, output, max_shard_size):
    """(end-to-end wall seconds, streaming seconds, bytes written, peak RSS bytes) of a converter child process."""
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, REPO_ROOT, source, output, max_shard_size],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while child.poll() is None:
        peak = max(peak, child_peak_rss(child.pid))
        time.sleep(0.02)
    wall = time.perf_counter() - start
    stdout, stderr = child.communicate()
    if child.returncode != 0:
        raise SystemExit(f"conversion failed:\n{stderr[-3000:]}")
    report = json.loads(stdout.strip().splitlines()[-1])
    return wall, report["weights_seconds"], report["bytes_written"], peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~250 MB source instead of >= 2 GB")
    parser.add_argument("--shard-size", type=float, default=None, help="source shard size in GB (default 0.5; quick 0.1)")
    parser.add_argument("--max-shard-size", default="5GB", help="the converter's output shard size")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--work-dir", default=None, help="where the synthetic checkpoint goes (default: a temp dir)")
    parser.add_argument("--warm-only", action="store_true", help="do not drop the page cache (no cold-cache row)")
    args = parser.parse_args(argv)

    # The language model: LLaMA-shaped, sized so that the whole source is >= 2 GB (quick: a few hundred MB).
    text = ({"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2, "num_attention_heads": 4}
            if args.quick else
            {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 16, "num_attention_heads": 16})
    text["vocab_size"] = 1000  # the tiny SentencePiece tokenizer of tests/fixtures (the converter adds 2 tokens)
    clip_intermediate = 64 if args.quick else 4096
    shard_bytes = int((args.shard_size or (0.1 if args.quick else 0.5)) * GB)
    tokenizer_dir = os.path.join(REPO_ROOT, "tests", "fixtures", "tokenizer")

    work = args.work_dir or tempfile.mkdtemp(prefix="tokenpacker_convert_bench_")
    source, output = os.path.join(work, "original"), os.path.join(work, "converted")
    rows, peaks = [], []
    try:
        start = time.perf_counter()
        total, largest = build_source(source, text, clip_intermediate, shard_bytes, tokenizer_dir)
        print(f"synthetic source: {total / GB:.2f} GB in {len([n for n in os.listdir(source) if n.endswith('.bin')])} "
              f"shards of <= {largest / GB:.2f} GB (built in {time.perf_counter() - start:.0f} s)")
        caches = ["cold", "warm"] if not args.warm_only and drop_page_cache() else ["warm"]
        for cache in caches:
            prepare = drop_page_cache if cache == "cold" else (lambda: plain_read(source))
            prepare()
            read_seconds = plain_read(source)
            prepare()
            wall, streaming, written, peak = run_converter(source, output, args.max_shard_size)
            peaks.append(peak)
            rows.append({
                "page_cache": cache, "source_GB": round(total / GB, 3), "plain_read_s": round(read_seconds, 3),
                "plain_read_MB_s": round(total / read_seconds / 1e6, 1), "streaming_s": round(streaming, 3),
                "streaming_MB_s": round(total / streaming / 1e6, 1),
                "streaming_ratio_vs_read": round(read_seconds / streaming, 3), "end_to_end_s": round(wall, 3),
                "end_to_end_ratio_vs_read": round(read_seconds / wall, 3), "written_GB": round(written / GB, 3),
                "peak_rss_GB": round(peak / GB, 3), "largest_shard_GB": round(largest / GB, 3),
                "peak_rss_over_largest_shard": round(peak / largest, 3),
            })
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    info = machine_info()
    peak = max(peaks)
    summary = {
        "peak_rss_GB": round(peak / GB, 3), "largest_source_shard_GB": round(largest / GB, 3),
        "peak_rss_limit_GB": round((largest + GB) / GB, 3), "peak_rss_within_limit": peak <= largest + GB,
        "streaming_ratio_target": 0.5,
        "streaming_ratio_within_target": all(row["streaming_ratio_vs_read"] >= 0.5 for row in rows),
    }
    csv_path, _, json_path = output_paths(args.output_dir, "conversion", args.quick)
    write_csv(csv_path, rows)
    write_json(json_path, {"machine": info, "summary": summary, "rows": rows})

    print(f"machine: {describe_machine(info)}")
    print_table(rows, [("page_cache", "cache", ""), ("plain_read_MB_s", "plain read MB/s", ".0f"),
                       ("streaming_MB_s", "streaming MB/s", ".0f"), ("streaming_ratio_vs_read", "ratio", ".2f"),
                       ("end_to_end_s", "end-to-end s", ".1f"), ("end_to_end_ratio_vs_read", "e2e ratio", ".2f"),
                       ("peak_rss_GB", "peak RSS GB", ".2f"), ("peak_rss_over_largest_shard", "RSS/shard", ".2f")])
    print(f"peak RSS {summary['peak_rss_GB']:.2f} GB; limit largest shard + 1 GB = {summary['peak_rss_limit_GB']:.2f} GB"
          f" -> {'met' if summary['peak_rss_within_limit'] else 'MISSED'}")
    for row in rows:
        print(f"{row['page_cache']} page cache: streaming at {row['streaming_ratio_vs_read']:.0%} of the plain read "
              f"(target >= 50 %) -> {'met' if row['streaming_ratio_vs_read'] >= 0.5 else 'MISSED'}")
    print("(the conversion writes as many bytes as it reads, the plain read writes none; end-to-end adds a fixed "
          "start-up: interpreter, imports, tokenizer, side files)")
    print(f"wrote {csv_path} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TokenPackerProjector vs the original implementation's layout: latency, agreement and achieved FLOP rate.

    python benchmarks/projector.py                                   # vs nn.MultiheadAttention in the original's layout
    python benchmarks/projector.py --original-repo /path/TokenPacker # vs the original `TokenPacker` class itself
    python benchmarks/projector.py --quick                           # toy widths, seconds
    python benchmarks/projector.py --device cuda --dtype bfloat16    # on a GPU (not run on CPU-only machines)

Both sides get the same weights and inputs, CLIP-L/336 shapes: point-query features x [B, 576, 1024], multi-level
features [B, 576, 4096], projector width 1024 with 8 heads, LLM width H. The reference is either the original
repository's `TokenPacker` (llava/model/multimodal_projector/builder.py, imported at run time from the path you give;
nothing of it is part of this package) or, without `--original-repo`, a module written here that applies
`torch.nn.MultiheadAttention` the way the original does: sequence-first, the s*s keys of a region as one sequence,
regions and images folded into the batch, one query per sequence, default `need_weights`.

Every round runs ours, the reference and a plain `torch.matmul` of the projector's largest GEMM shape
([B*576, 4096] x [4096, 1024]) back to back in rotating order. Latencies are medians over the rounds; the speed ratio
(reference / ours) and the fraction of the matmul rate are computed within each round and then the median taken, with
the 25th/75th percentiles beside them. FLOP counts are analytic (the GEMMs and the attention products; LayerNorm,
GELU, interpolation and bias additions are not counted), for each side as it computes: the reference projects every
key and value; ours applies the key/value projections on the query side (one per query instead of one per key), so
it does less work for the same result, and its achieved rate is its own FLOPs over its own time. Writes projector.csv,
projector.png and projector.json (machine, settings) to benchmarks/results/ (or --output-dir).

On a machine shared with other jobs, use `--threads 1 --clock cpu`: with more threads than free cores every parallel
op waits for a descheduled thread (milliseconds per op), and elapsed time counts the time other jobs hold the core;
single-threaded CPU time measures the work itself. The default is elapsed (wall-clock) time with torch's threads.
"""

import argparse
import importlib.util
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402

bench_utils.add_repo_to_path()
from modeling_tokenpacker import TokenPackerConfig, TokenPackerProjector  # noqa: E402

ORIGINAL_BUILDER = os.path.join("llava", "model", "multimodal_projector", "builder.py")
# Widths the original's TokenPacker hard-codes (vision 1024, four levels -> 4096, projector 1024, 8 heads).
ORIGINAL_WIDTHS = {"vision_width": 1024, "num_levels": 4, "embed_dim": 1024, "num_heads": 8}

FULL = {"vision_width": 1024, "num_levels": 4, "embed_dim": 1024, "num_heads": 8, "grid_size": 24,
        "llm_widths": [4096, 1024], "batch_sizes": [1, 8], "repeats": 9}
QUICK = {"vision_width": 64, "num_levels": 4, "embed_dim": 64, "num_heads": 2, "grid_size": 24,
         "llm_widths": [128], "batch_sizes": [1, 2], "repeats": 2}

CSV_COLUMNS = [
    "reference", "scale_factor", "llm_width", "batch", "device", "dtype", "threads", "clock", "tokens_out",
    "ours_ms", "ours_ms_p25", "ours_ms_p75", "reference_ms", "reference_ms_p25", "reference_ms_p75",
    "speed_ratio_reference_over_ours", "speed_ratio_p25", "speed_ratio_p75", "max_abs_diff", "max_abs_output",
    "reference_gflop_per_image", "ours_gflop_per_image", "ours_gflops", "matmul_shape", "matmul_ms", "matmul_gflops",
    "ours_fraction_of_matmul_rate",
]


def projector_config(widths, scale_factor, llm_width):
    grid = widths["grid_size"]
    return TokenPackerConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": widths["vision_width"],
                       "intermediate_size": 4 * widths["vision_width"], "num_hidden_layers": 24,
                       "num_attention_heads": max(1, widths["vision_width"] // 64), "image_size": grid * 14,
                       "patch_size": 14},
        text_config={"model_type": "llama", "hidden_size": llm_width, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 8 if llm_width % 8 == 0 else 1, "vocab_size": 64},
        scale_factor=scale_factor,
        region_feature_layers=[12, 16, 22, 23][: widths["num_levels"]],
        projector_hidden_size=widths["embed_dim"],
        projector_num_heads=widths["num_heads"],
    )


def projector_flops(tokens, scale_factor, vision_width, num_levels, embed_dim, num_heads, llm_width, absorbed=False):
    """Multiply-adds x 2 of one image's projector pass, by part (GEMMs and the attention products). `absorbed`: the
    key/value projections applied on the query side (`TokenPackerRegionAttention.absorbed_attention`), one E x E
    product per query for each instead of one per key, and every head's scores and pooling over the full width E."""
    queries = tokens // scale_factor**2
    region_width = vision_width * num_levels
    parts = {
        "key_value_mlps": 2 * 2 * tokens * (region_width * embed_dim + embed_dim * embed_dim),
        "query_proj": 2 * queries * vision_width * embed_dim,
        "attention_projections": 2 * (2 * queries + (2 * queries if absorbed else 2 * tokens)) * embed_dim * embed_dim,
        "attention_products": 2 * 2 * tokens * embed_dim * (num_heads if absorbed else 1),
        "output_mlp": 2 * queries * (embed_dim * llm_width + llm_width * llm_width),
    }
    parts["total"] = sum(parts.values())
    return parts


def randomize(module, seed):
    """Fan-in-scaled random weights and non-trivial biases and norm gains, so outputs are O(1) and a dropped term
    would show in the difference."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                param.copy_(noise / math.sqrt(param.shape[1]))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.1 * noise)
    return module


def original_state_dict(ours):
    """Our projector's weights under the original's parameter names (q/k/v packed into `in_proj_*`)."""
    p = {name: tensor.detach().clone() for name, tensor in ours.state_dict().items()}
    return {
        "q_proj_1.weight": p["query_proj.weight"],
        "k_proj_1.0.weight": p["key_mlp.linear_1.weight"], "k_proj_1.0.bias": p["key_mlp.linear_1.bias"],
        "k_proj_1.2.weight": p["key_mlp.linear_2.weight"], "k_proj_1.2.bias": p["key_mlp.linear_2.bias"],
        "v_proj_1.0.weight": p["value_mlp.linear_1.weight"], "v_proj_1.0.bias": p["value_mlp.linear_1.bias"],
        "v_proj_1.2.weight": p["value_mlp.linear_2.weight"], "v_proj_1.2.bias": p["value_mlp.linear_2.bias"],
        "ln_q_1.weight": p["query_norm.weight"], "ln_q_1.bias": p["query_norm.bias"],
        "ln_k_1.weight": p["key_norm.weight"], "ln_k_1.bias": p["key_norm.bias"],
        "ln_v_1.weight": p["value_norm.weight"], "ln_v_1.bias": p["value_norm.bias"],
        "clip_attn.in_proj_weight": torch.cat([p[f"attention.{x}_proj.weight"] for x in "qkv"]),
        "clip_attn.in_proj_bias": torch.cat([p[f"attention.{x}_proj.bias"] for x in "qkv"]),
        "clip_attn.out_proj.weight": p["attention.out_proj.weight"],
        "clip_attn.out_proj.bias": p["attention.out_proj.bias"],
        "mlp.0.weight": p["output_mlp.linear_1.weight"], "mlp.0.bias": p["output_mlp.linear_1.bias"],
        "mlp.2.weight": p["output_mlp.linear_2.weight"], "mlp.2.bias": p["output_mlp.linear_2.bias"],
    }


class MultiheadAttentionReference(nn.Module):
    """The original's computation in the original's layout, written here: parameter names as in its state dict,
    `nn.MultiheadAttention` (sequence-first) over one sequence per (region, image) holding that region's s*s keys,
    with a single query each. `forward(image_features, region_features)` like ours."""

    def __init__(self, grid_size, scale_factor, vision_width, region_width, embed_dim, num_heads, llm_width):
        super().__init__()
        self.grid_size, self.scale_factor = grid_size, scale_factor
        self.q_proj_1 = nn.Linear(vision_width, embed_dim, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(region_width, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.v_proj_1 = nn.Sequential(nn.Linear(region_width, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.ln_q_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_k_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_v_1 = nn.LayerNorm(embed_dim, eps=1e-6)
        self.clip_attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))

    def sequence_first_regions(self, features):
        """[B, g*g, E] -> [s*s, (g/s)^2 * B, E]: position within the region is the sequence axis; the batch axis is
        region-major, image-minor."""
        batch, _, width = features.shape
        s, n = self.scale_factor, self.grid_size // self.scale_factor
        grid = features.reshape(batch, n, s, n, s, width).permute(2, 4, 1, 3, 0, 5)
        return grid.reshape(s * s, n * n * batch, width)

    def forward(self, image_features, region_features):
        batch, _, channels = image_features.shape
        g, n = self.grid_size, self.grid_size // self.scale_factor
        key = self.sequence_first_regions(self.ln_k_1(self.k_proj_1(region_features)))
        value = self.sequence_first_regions(self.ln_v_1(self.v_proj_1(region_features)))
        grid = image_features.reshape(batch, g, g, channels).permute(0, 3, 1, 2).float()
        points = F.interpolate(grid, size=(n, n), mode="bilinear", align_corners=False)
        points = points.permute(0, 2, 3, 1).reshape(batch, n * n, channels).to(image_features.dtype)
        query = self.ln_q_1(self.q_proj_1(points)).transpose(0, 1).reshape(1, n * n * batch, -1)
        attended = self.clip_attn(query, key, value)[0]  # [1, Q*B, E], need_weights left at its default
        return self.mlp(attended.reshape(n * n, batch, -1).transpose(0, 1))


def load_original_class(path):
    """The original repository's `TokenPacker` class, imported from builder.py at run time (repo root or file)."""
    builder = path if path.endswith(".py") else os.path.join(path, ORIGINAL_BUILDER)
    if not os.path.isfile(builder):
        raise SystemExit(f"--original-repo: expected the original repository root (containing {ORIGINAL_BUILDER}) or "
                         f"that file itself; {builder} does not exist.")
    spec = importlib.util.spec_from_file_location("tokenpacker_original_builder", builder)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TokenPacker


class OriginalAdapter(nn.Module):
    """Calls the original's `forward((single_level, multi_level))` with our argument order."""

    def __init__(self, original):
        super().__init__()
        self.original = original

    def forward(self, image_features, region_features):
        return self.original((image_features, region_features))


def build_pair(widths, scale_factor, llm_width, original_class, device, dtype, seed):
    config = projector_config(widths, scale_factor, llm_width)
    ours = randomize(TokenPackerProjector(config), seed).eval()
    if original_class is not None:
        reference = OriginalAdapter(original_class(hidden_size=llm_width, scale_factor=scale_factor))
    else:
        reference = MultiheadAttentionReference(widths["grid_size"], scale_factor, widths["vision_width"],
                                                widths["vision_width"] * widths["num_levels"], widths["embed_dim"],
                                                widths["num_heads"], llm_width)
    target = reference.original if original_class is not None else reference
    target.load_state_dict(original_state_dict(ours), strict=True)
    return ours.to(device, dtype), reference.eval().to(device, dtype)


def profile_once(module, inputs, label, rows=12):
    from torch.profiler import profile

    with torch.inference_mode():
        module(*inputs)
        with profile() as prof:
            module(*inputs)
    print(f"\nprofile of {label} (one call):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def plot(rows, path, title):
    plt = bench_utils.import_pyplot()
    if plt is None:
        return False
    labels = [f"s={r['scale_factor']} H={r['llm_width']}\nB={r['batch']}" for r in rows]
    xs = range(len(rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(9, 2.2 * len(rows) + 4), 4.6))
    width = 0.38
    ours = [r["ours_ms"] / r["batch"] for r in rows]
    ref = [r["reference_ms"] / r["batch"] for r in rows]
    left.bar([x - width / 2 for x in xs], ref, width, label=rows[0]["reference"], color="#999999")
    left.bar([x + width / 2 for x in xs], ours, width, label="ours", color="#1f77b4")
    for x, r, top in zip(xs, rows, map(max, ref, ours)):
        left.annotate(f"{r['speed_ratio_reference_over_ours']:.2f}x", (x, top), ha="center", va="bottom", fontsize=8)
    left.set_xticks(list(xs), labels, fontsize=8)
    left.set_ylabel("median latency per image (ms)")
    left.set_title("latency (label: reference / ours)")
    left.set_ylim(0, 1.15 * max(max(ref), max(ours)))
    left.legend(fontsize=8, loc="lower right")
    right.bar([x - width / 2 for x in xs], [r["matmul_gflops"] for r in rows], width, label="plain matmul",
              color="#bbbbbb")
    right.bar([x + width / 2 for x in xs], [r["ours_gflops"] for r in rows], width, label="ours", color="#1f77b4")
    for x, r in zip(xs, rows):
        right.annotate(f"{r['ours_fraction_of_matmul_rate']:.0%}", (x, max(r["ours_gflops"], r["matmul_gflops"])),
                       ha="center", va="bottom", fontsize=8)
    right.set_xticks(list(xs), labels, fontsize=8)
    right.set_ylabel("GFLOP/s")
    right.set_title("achieved rate (label: ours / matmul)")
    right.set_ylim(0, 1.15 * max(max(r["ours_gflops"], r["matmul_gflops"]) for r in rows))
    right.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def speed_verdict(rows):
    """'met' when every median ratio is >= 1; 'parity' when the misses have 1.0 inside their per-round quartiles."""
    if all(r["speed_ratio_reference_over_ours"] >= 1.0 for r in rows):
        return "met"
    if all(r["speed_ratio_p75"] >= 1.0 for r in rows):
        return "at parity within noise (median below 1.0 somewhere, but 1.0 inside the per-round quartiles)"
    return "MISSED"


def plot_title(reference_name, dtype, clock, info):
    return f"TokenPackerProjector vs {reference_name}, {dtype}, {clock} clock\n{bench_utils.describe_machine(info)}"


def replot(output_dir, quick):
    csv_path, png_path, json_path = bench_utils.output_paths(output_dir, "projector", quick)
    rows = bench_utils.read_csv_rows(csv_path)
    with open(json_path) as handle:
        meta = json.load(handle)
    args = meta["arguments"]
    if plot(rows, png_path, plot_title(meta["reference"], args["dtype"], args["clock"], meta["machine"])):
        print(f"wrote {png_path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-repo", help="path of the original TokenPacker repository (or its builder.py)")
    parser.add_argument("--quick", action="store_true", help="toy widths and two rounds (seconds; smoke test)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8 (quick: 1 2)")
    parser.add_argument("--llm-widths", type=int, nargs="+", help="LLM hidden sizes H (default: 4096 1024)")
    parser.add_argument("--scale-factors", type=int, nargs="+", default=[2], help="default: 2 (144 tokens)")
    parser.add_argument("--repeats", type=int, help="timed rounds per configuration (default 9, quick 2)")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of both sides")
    bench_utils.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    if args.replot:
        return replot(args.output_dir, args.quick)

    widths = dict(QUICK if args.quick else FULL)
    if args.original_repo and any(widths[k] != v for k, v in ORIGINAL_WIDTHS.items()):
        parser.error("--original-repo needs the real widths (the original hard-codes 1024/4096 and 8 heads); "
                     "drop --quick")
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    device, dtype = bench_utils.check_device(torch.device(args.device)), bench_utils.DTYPES[args.dtype]
    sync = bench_utils.synchronizer(device)
    clock = bench_utils.get_clock(args.clock, device, torch.get_num_threads())
    original_class = load_original_class(args.original_repo) if args.original_repo else None
    reference_name = "original" if original_class is not None else "mha-reference"
    batch_sizes = args.batch_sizes or widths["batch_sizes"]
    llm_widths = args.llm_widths or widths["llm_widths"]
    repeats = args.repeats or widths["repeats"]
    tokens = widths["grid_size"] ** 2
    region_width = widths["vision_width"] * widths["num_levels"]
    info = bench_utils.machine_info(device)
    print(f"machine: {bench_utils.describe_machine(info)}")
    print(f"reference: {reference_name}" + (f" ({args.original_repo})" if original_class else
                                            " (nn.MultiheadAttention in the original's layout)"))
    print(f"shapes: x [B, {tokens}, {widths['vision_width']}], multi-level [B, {tokens}, {region_width}], projector "
          f"width {widths['embed_dim']} ({widths['num_heads']} heads), {args.dtype} on {device}, "
          f"{repeats} timed rounds (median), {args.clock} clock")

    rows = []
    for scale_factor in args.scale_factors:
        for llm_width in llm_widths:
            ours, reference = build_pair(widths, scale_factor, llm_width, original_class, device, dtype, args.seed)
            dims = (tokens, scale_factor, widths["vision_width"], widths["num_levels"], widths["embed_dim"],
                    widths["num_heads"], llm_width)
            flops = projector_flops(*dims)
            ours_flops = projector_flops(*dims, absorbed=ours.attention.projections_can_be_absorbed())
            for label, counted in (("reference", flops), ("ours", ours_flops)):
                parts = ", ".join(f"{k} {v / 1e9:.3f}" for k, v in counted.items() if k != "total")
                print(f"{'' if label == 'ours' else chr(10)}s={scale_factor}, H={llm_width}, {label}: "
                      f"{counted['total'] / 1e9:.3f} GFLOP per image ({parts})")
            for batch in batch_sizes:
                generator = torch.Generator().manual_seed(args.seed + batch)
                inputs = (torch.randn(batch, tokens, widths["vision_width"], generator=generator).to(device, dtype),
                          torch.randn(batch, tokens, region_width, generator=generator).to(device, dtype))
                matmul_a = torch.randn(batch * tokens, region_width, generator=generator).to(device, dtype)
                matmul_b = torch.randn(region_width, widths["embed_dim"], generator=generator).to(device, dtype)
                with torch.inference_mode():
                    ours_out, ref_out = ours(*inputs), reference(*inputs)
                    max_abs_diff = (ours_out.float() - ref_out.float()).abs().max().item()
                    samples = bench_utils.time_interleaved(
                        {"ours": lambda: ours(*inputs), "reference": lambda: reference(*inputs),
                         "matmul": lambda: torch.matmul(matmul_a, matmul_b)},
                        repeats, args.warmup, sync, clock)
                med = {name: bench_utils.median(values) for name, values in samples.items()}
                ours_q, ref_q = bench_utils.spread(samples["ours"]), bench_utils.spread(samples["reference"])
                ours_flop, matmul_flop = ours_flops["total"] * batch, 2 * batch * tokens * region_width * widths["embed_dim"]
                ours_rate, matmul_rate = ours_flop / med["ours"] / 1e9, matmul_flop / med["matmul"] / 1e9
                # Ratios are taken within each round (the runs were back to back) and then the median over rounds.
                ratios = [r / o for r, o in zip(samples["reference"], samples["ours"])]
                fractions = [(ours_flop / o) / (matmul_flop / m) for o, m in zip(samples["ours"], samples["matmul"])]
                rows.append({
                    "reference": reference_name, "scale_factor": scale_factor, "llm_width": llm_width,
                    "batch": batch, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
                    "clock": args.clock,
                    "tokens_out": tokens // scale_factor**2,
                    "ours_ms": med["ours"] * 1e3, "ours_ms_p25": ours_q[0] * 1e3, "ours_ms_p75": ours_q[1] * 1e3,
                    "reference_ms": med["reference"] * 1e3, "reference_ms_p25": ref_q[0] * 1e3,
                    "reference_ms_p75": ref_q[1] * 1e3,
                    "speed_ratio_reference_over_ours": bench_utils.median(ratios),
                    "speed_ratio_p25": bench_utils.spread(ratios)[0], "speed_ratio_p75": bench_utils.spread(ratios)[1],
                    "max_abs_diff": max_abs_diff, "max_abs_output": ref_out.float().abs().max().item(),
                    "reference_gflop_per_image": flops["total"] / 1e9,
                    "ours_gflop_per_image": ours_flops["total"] / 1e9, "ours_gflops": ours_rate,
                    "matmul_shape": f"[{batch * tokens},{region_width}]x[{region_width},{widths['embed_dim']}]",
                    "matmul_ms": med["matmul"] * 1e3, "matmul_gflops": matmul_rate,
                    "ours_fraction_of_matmul_rate": bench_utils.median(fractions),
                })
                if args.profile and batch == max(batch_sizes):
                    profile_once(ours, inputs, f"ours, s={scale_factor} H={llm_width} B={batch}")
                    profile_once(reference, inputs, f"{reference_name}, s={scale_factor} H={llm_width} B={batch}")

    print()
    bench_utils.print_table(rows, [
        ("scale_factor", "s", "d"), ("llm_width", "H", "d"), ("batch", "B", "d"),
        ("ours_ms", "ours ms", ".1f"), ("reference_ms", f"{reference_name} ms", ".1f"),
        ("speed_ratio_reference_over_ours", "ref/ours", ".3f"), ("speed_ratio_p25", "p25", ".3f"),
        ("speed_ratio_p75", "p75", ".3f"), ("max_abs_diff", "max|diff|", ".1e"),
        ("reference_gflop_per_image", "ref GFLOP/img", ".2f"), ("ours_gflop_per_image", "ours GFLOP/img", ".2f"),
        ("ours_gflops", "ours GFLOP/s", ".1f"),
        ("matmul_gflops", "matmul GFLOP/s", ".1f"), ("ours_fraction_of_matmul_rate", "ours/matmul", ".0%"),
    ])
    agree = all(r["max_abs_diff"] <= 1e-5 for r in rows)
    note = " (toy widths: the targets are meant for the full run)" if args.quick else ""
    print(f"\ntargets{note}: " + "; ".join([
        f"max|diff| <= 1e-5: {'met' if agree else 'MISSED'}" if args.dtype == "float32" else
        f"max|diff| <= 1e-5: for float32 only ({args.dtype}: {max(r['max_abs_diff'] for r in rows):.1e})",
        f"ref/ours >= 1.0: {speed_verdict(rows)}",
        "ours >= 80% of matmul rate at the largest batch: "
        + ("met" if all(r["ours_fraction_of_matmul_rate"] >= 0.8 for r in rows if r["batch"] == max(batch_sizes))
           else "MISSED"),
    ]))

    csv_path, png_path, json_path = bench_utils.output_paths(args.output_dir, "projector", args.quick)
    bench_utils.write_csv(csv_path, [{key: row[key] for key in CSV_COLUMNS} for row in rows])
    bench_utils.write_json(json_path, {"benchmark": "projector", "machine": info, "arguments": bench_utils.portable_arguments(args),
                                       "widths": widths, "reference": reference_name})
    print(f"wrote {csv_path} and {json_path}")
    if plot(rows, png_path, plot_title(reference_name, args.dtype, args.clock, info)):
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

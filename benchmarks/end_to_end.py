"""Time to first token and decode speed: TokenPacker at 144/64/36 tokens and VLoRA (no visual tokens) vs the
576-token LLaVA-1.5 baseline.

    python benchmarks/end_to_end.py                   # CPU-sized model (dims printed), a few minutes
    python benchmarks/end_to_end.py --threads 1 --clock cpu   # stable numbers on a machine shared with other jobs
    python benchmarks/end_to_end.py --quick           # toy dims, seconds (smoke test)
    python benchmarks/end_to_end.py --batch-size 8    # 8 copies of the prompt in one generate call (serving)
    python benchmarks/end_to_end.py --size 7b --device cuda --dtype bfloat16   # CLIP-L/336 + Vicuna-7B dims, GPU

Six models with one vision tower and one language model (the same seed-initialised weights in all of them):
- `mlp2x_gelu`: `TokenPackerForConditionalGeneration` with LLaVA-1.5's projector, 576 visual tokens (the baseline);
- `llava_native`: transformers' `LlavaForConditionalGeneration` with identical dims, the tower, projector, language
  model and head copied from the baseline (its first-token logits are checked against the baseline's);
- `tokenpacker_s2/_s3/_s4`: the same class with the TokenPacker projector at scale 2/3/4 (144/64/36 tokens);
- `vlora`: `VLoRAForConditionalGeneration` on the same tower, language model and head, with a perceptual weights
  generator in the release's proportions (`vlora_bench.GENERATOR_SIZES`): one placeholder position per image, the
  image's rank-r deltas on q, k, v, o and m of every 4th layer (`--no-vlora` leaves it out).

Each round runs `generate` (greedy, a fixed number of new tokens) once per model in rotating order; a streamer
timestamps the tokens. Time to first token (TTFT) = call to first generated token: vision tower, projector, language
model prefill over the whole prompt, first sampling step. Decode rate = (new tokens - 1) / (last - first token time).
In the same rounds `get_image_features` (vision tower + projector; for VLoRA `get_perceptual_weights`, vision tower
+ generator) is timed on its own, which splits TTFT into image encoding and the rest (language-model prefill, first logits row, generate's bookkeeping). Speed-ups and decode ratios
are taken within a round (runs back to back), then the median over rounds. With `--batch-size B` every call carries
B copies of the image and prompt: TTFT is then the time to the first token of all B sequences, the decode rate is per
sequence (steps per second; B times that in all), KV-cache bytes stay per image, and the FLOP ratios are those of
batch 1 (B cancels).

Next to each measured prefill speed-up the analytic limits for the config, from FLOP counts:
- `analytic_lm_prefill_ratio`: language-model prefill FLOPs with the 576-token prompt / with the packed prompt
  (text tokens included; the causal attention's quadratic term included; the one row of logits `generate` computes);
- `analytic_total_prefill_ratio`: the same with the vision tower and projector added on both sides (they cost the
  same or more with TokenPacker, so this Amdahl limit is below the language-model ratio).
For VLoRA the language-model FLOPs include the deltas' `2 r (in + out)` per patched map and text token, and the
projector column holds the generator's FLOPs (`vlora_bench.generator_flops`). KV-cache bytes per image: 2 x layers x
kv_heads x head_dim x image tokens x bytes per element (VLoRA: the one placeholder position). `visual_params_m`: the
projector's or generator's parameters, `per_image_state_values`: what an image leaves in memory besides the KV cache
(VLoRA's A factors). Writes
end_to_end.csv, end_to_end.png and end_to_end.json (machine, dims) to benchmarks/results/ (or --output-dir).
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402
import vlora_bench  # noqa: E402
from projector import projector_flops  # noqa: E402

bench_utils.add_repo_to_path()
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from modeling_tokenpacker import TokenPackerConfig, TokenPackerForConditionalGeneration  # noqa: E402
from modeling_tokenpacker.demo import build_tiny_processor, build_tiny_tokenizer, synthesize_image  # noqa: E402

# Vision towers keep CLIP-L/336's shape where it matters (336 px, patch 14 -> 24 x 24 grid, 24 layers, multi-level
# layers 12/16/22/23); widths shrink with the language model's so that the proportions stay those of the real model:
# with this prompt the vision tower is 4.6 % of the 576-token prefill FLOPs for "cpu" and 4.5 % for "7b" (CLIP-L +
# Vicuna-7B), and the whole-prefill limit is 89/80/73 % of the language-model-only limit at s=2/3/4 (90/81/74 %).
SIZES = {
    "quick": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 24, "num_attention_heads": 2},
        "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4, "vocab_size": 512},
        "projector_hidden_size": 32, "projector_num_heads": 2, "new_tokens": 3, "repeats": 2,
    },
    "cpu": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 24, "num_attention_heads": 2},
        "text": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
                 "num_key_value_heads": 16, "vocab_size": 32064},
        "projector_hidden_size": 256, "projector_num_heads": 2, "new_tokens": 16, "repeats": 7,
    },
    "7b": {  # CLIP ViT-L/14-336 + Vicuna-7B, the released TokenPacker-7b dims
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
        "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 32, "vocab_size": 32064},
        "projector_hidden_size": 1024, "projector_num_heads": 8, "new_tokens": 32, "repeats": 7,
    },
}
VICUNA_7B = {"num_hidden_layers": 32, "num_key_value_heads": 32, "head_dim": 128}
QUESTION = "What is in the image? Describe the image briefly."

CSV_COLUMNS = [
    "variant", "model_class", "projector", "batch_size", "scale_factor", "image_tokens", "prompt_tokens", "device",
    "dtype", "threads", "clock",
    "ttft_ms", "ttft_ms_p25", "ttft_ms_p75", "prefill_speedup_vs_mlp2x", "prefill_speedup_p25", "prefill_speedup_p75",
    "analytic_lm_prefill_ratio", "speedup_fraction_of_lm_ratio", "analytic_total_prefill_ratio",
    "speedup_fraction_of_total_ratio", "encode_ms", "lm_part_ms", "lm_part_speedup_vs_mlp2x",
    "lm_part_fraction_of_lm_ratio", "decode_tokens_per_s", "decode_ratio_vs_mlp2x", "decode_ratio_p25",
    "decode_ratio_p75", "kv_cache_bytes_per_image", "kv_cache_bytes_per_image_vicuna7b_fp16", "lm_prefill_gflop",
    "vision_gflop", "projector_gflop", "visual_params_m", "per_image_state_values", "max_abs_logit_diff_vs_mlp2x",
]


class TokenTimes(BaseStreamer):
    """Records when each generated token reaches the streamer (the first `put` is the prompt)."""

    def __init__(self, sync, clock):
        self.sync, self.clock, self.times, self.seen_prompt = sync, clock, [], False

    def put(self, value):
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.sync()
        self.times.append(self.clock())

    def end(self):
        pass


@contextlib.contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_config(dims, tokenizer, projector_type, scale_factor=2):
    text = dict(dims["text"], model_type="llama", max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(dims["vision"], model_type="clip_vision_model", image_size=336, patch_size=14)
    return TokenPackerConfig(
        vision_config=vision, text_config=text, projector_type=projector_type, scale_factor=scale_factor,
        projector_hidden_size=dims["projector_hidden_size"], projector_num_heads=dims["projector_num_heads"],
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def set_generation_ids(model, tokenizer):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def build_models(dims, tokenizer, scale_factors, device, dtype, seed, vlora_size=None):
    """name -> model. The TokenPacker variants and VLoRA (with `vlora_size`, a key of `vlora_bench.GENERATOR_SIZES`)
    share the baseline's vision tower, language model and head (module objects); the native LLaVA model gets copies
    of them and of the baseline's projector."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    models = {}
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(seed)
        baseline = TokenPackerForConditionalGeneration(build_config(dims, tokenizer, "mlp2x_gelu")).eval()
        models["mlp2x_gelu"] = baseline
        config = baseline.config
        llava_config = LlavaConfig(
            vision_config=config.vision_config.to_dict(), text_config=config.text_config.to_dict(),
            image_token_id=config.image_token_id, projector_hidden_act=config.projector_hidden_act,
            vision_feature_layer=config.vision_feature_layer, vision_feature_select_strategy="default",
            image_seq_length=config.image_seq_length, pad_token_id=tokenizer.pad_token_id,
        )
        llava = LlavaForConditionalGeneration(llava_config).eval()
        copy_into_llava(llava, baseline)
        models["llava_native"] = llava
        for scale_factor in scale_factors:
            torch.manual_seed(seed + scale_factor)
            variant = TokenPackerForConditionalGeneration(build_config(dims, tokenizer, "tokenpacker", scale_factor))
            variant.model.vision_tower = baseline.model.vision_tower
            variant.model.language_model = baseline.model.language_model
            variant.lm_head = baseline.lm_head
            models[f"tokenpacker_s{scale_factor}"] = variant.eval()
        if vlora_size is not None:
            models["vlora"] = vlora_bench.build_vlora(vlora_size, baseline, tokenizer, seed + 100)
    return {name: set_generation_ids(model, tokenizer) for name, model in models.items()}


def copy_into_llava(llava, baseline):
    """Copy tower, projector, language model and head. 5.x: `llava.model.{vision_tower, language_model}` (a
    CLIPVisionModel without a `vision_model` level, a base LlamaModel), `llava.lm_head`; 4.x: a `vision_model` level
    in the tower and `llava.language_model` a causal LM holding `model` and `lm_head`."""
    inner = getattr(llava, "model", llava)
    tower = getattr(inner.vision_tower, "vision_model", inner.vision_tower)
    tower.load_state_dict(baseline.model.vision_tower.state_dict())
    inner.multi_modal_projector.load_state_dict(baseline.model.multi_modal_projector.state_dict())
    language_model = inner.language_model
    if hasattr(language_model, "lm_head"):  # 4.x
        language_model.model.load_state_dict(baseline.model.language_model.state_dict())
        language_model.lm_head.load_state_dict(baseline.lm_head.state_dict())
    else:
        language_model.load_state_dict(baseline.model.language_model.state_dict())
        llava.lm_head.load_state_dict(baseline.lm_head.state_dict())


def vision_flops(vision, tokens):
    """Patch embedding and encoder layers of a CLIP tower over `tokens` positions (patches + CLS), full attention."""
    width, inter, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patches = tokens - 1
    per_layer = 2 * tokens * (4 * width * width + 2 * width * inter) + 2 * 2 * tokens * tokens * width
    return 2 * patches * 3 * 14 * 14 * width + layers * per_layer


def lm_prefill_flops(text, prompt_tokens):
    """Decoder layers over the prompt (causal attention: position t attends to t+1 keys) + one row of logits."""
    width, inter, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    head_dim = width // heads
    linear = width * heads * head_dim * 2 + 2 * width * kv_heads * head_dim + 3 * width * inter
    attended = prompt_tokens * (prompt_tokens + 1) // 2
    per_layer = 2 * prompt_tokens * linear + 2 * 2 * heads * head_dim * attended
    return layers * per_layer + 2 * width * text["vocab_size"]


def kv_cache_bytes(layers, kv_heads, head_dim, tokens, element_bytes):
    return 2 * layers * kv_heads * head_dim * tokens * element_bytes


def analytic(dims, config, prompt_tokens):
    if config.model_type == "vlora":
        grid = config.vision_config.image_size // config.vision_config.patch_size
        return {"vision": vision_flops(dims["vision"], grid * grid + 1),
                "projector": vlora_bench.generator_flops(config),
                "lm": lm_prefill_flops(dims["text"], prompt_tokens)
                + prompt_tokens * vlora_bench.delta_flops_per_token(config)}
    grid = config.grid_size
    vision = vision_flops(dims["vision"], grid * grid + 1)
    width = dims["vision"]["hidden_size"]
    llm_width = dims["text"]["hidden_size"]
    if config.projector_type == "mlp2x_gelu":
        projector = 2 * grid * grid * (width * llm_width + llm_width * llm_width)
    else:
        # As executed: plain nn.Linear attention projections take the absorbed path.
        projector = projector_flops(grid * grid, config.scale_factor, width, len(config.region_feature_layers),
                                    config.projector_hidden_size, config.projector_num_heads, llm_width,
                                    absorbed=True)["total"]
    return {"vision": vision, "projector": projector, "lm": lm_prefill_flops(dims["text"], prompt_tokens)}


def prepare_inputs(tokenizer, image_seq_length, device, dtype, batch_size=1):
    """`batch_size` copies of one image and its chat prompt (equal lengths, no padding)."""
    processor = build_tiny_processor(tokenizer, image_seq_length)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[synthesize_image()] * batch_size, text=[text] * batch_size, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return {key: value.to(device) for key, value in inputs.items()}


def timed_generate(model, inputs, new_tokens, sync, clock):
    streamer = TokenTimes(sync, clock)
    sync()
    start = clock()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    times = streamer.times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return times[0] - start, decode


def timed_encode(model, pixel_values, sync, clock):
    """Seconds of `get_image_features` alone: vision tower and projector (VLoRA: `get_perceptual_weights`, vision
    tower and generator)."""
    sync()
    start = clock()
    if hasattr(model, "get_perceptual_weights"):
        model.get_perceptual_weights(pixel_values)
    else:
        model.get_image_features(pixel_values=pixel_values, return_dict=True)
    sync()
    return clock() - start


def plot(rows, path, title):
    plt = bench_utils.import_pyplot()
    if plt is None:
        return False
    names = [f"{r['variant']}\n({r['image_tokens']} tok)" for r in rows]
    colors = [{"mlp2x_gelu": "#999999", "vlora": "#2ca02c"}.get(r["projector"], "#1f77b4") for r in rows]
    xs = list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    ax.bar(xs, [r["ttft_ms"] for r in rows], color=colors)
    ax.errorbar(xs, [r["ttft_ms"] for r in rows], fmt="none", ecolor="black", capsize=3,
                yerr=[[r["ttft_ms"] - r["ttft_ms_p25"] for r in rows], [r["ttft_ms_p75"] - r["ttft_ms"] for r in rows]])
    ax.set_title("time to first token (median, p25-p75)")
    ax.set_ylabel("ms")
    ax = axes[0][1]
    width = 0.2
    bars = [("prefill_speedup_vs_mlp2x", "measured: TTFT", "#1f77b4"),
            ("lm_part_speedup_vs_mlp2x", "measured: TTFT minus image encoding", "#6baed6"),
            ("analytic_total_prefill_ratio", "analytic: whole prefill", "#c6dbef"),
            ("analytic_lm_prefill_ratio", "analytic: language model only", "#dddddd")]
    for index, (key, label, color) in enumerate(bars):
        ax.bar([x + (index - 1.5) * width for x in xs], [r[key] for r in rows], width, label=label, color=color)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['speedup_fraction_of_lm_ratio']:.0%}", (x - 1.5 * width, r["prefill_speedup_vs_mlp2x"]),
                    ha="center", va="bottom", fontsize=7)
    ax.set_title("prefill speed-up vs mlp2x_gelu\n(label: TTFT speed-up / language-model-only limit)", fontsize=10)
    ax.legend(fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax = axes[1][0]
    ax.bar(xs, [r["decode_tokens_per_s"] for r in rows], color=colors)
    for x, r in zip(xs, rows):
        ax.annotate(f"{r['decode_ratio_vs_mlp2x']:.2f}x", (x, r["decode_tokens_per_s"]), ha="center", va="bottom",
                    fontsize=8)
    ax.set_title("decode rate (label: vs mlp2x_gelu)")
    ax.set_ylabel("tokens/s")
    ax = axes[1][1]
    ax.bar(xs, [r["kv_cache_bytes_per_image_vicuna7b_fp16"] / 2**20 for r in rows], color=colors)
    ax.set_title("KV cache per image, Vicuna-7B dims in fp16 (analytic)")
    ax.set_ylabel("MiB")
    for row in axes:
        for ax in row:
            ax.set_xticks(xs, names, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_title(size, dtype, new_tokens, clock, info, batch_size=1):
    return (f"TokenPacker and VLoRA vs 576-token baseline, {size} dims, batch {batch_size}, {dtype}, {new_tokens} new tokens, "
            f"{clock} clock\n{bench_utils.describe_machine(info)}")


def result_paths(output_dir, size, batch_size=1):
    """end_to_end[_quick|_7b][_b<B>].{csv,png,json}"""
    suffix = f"_b{batch_size}" if batch_size > 1 else ""
    if size in ("quick", "cpu"):
        return bench_utils.output_paths(output_dir, "end_to_end" + suffix, size == "quick")
    stem = os.path.join(output_dir, f"end_to_end_{size}{suffix}")
    os.makedirs(output_dir, exist_ok=True)
    return stem + ".csv", stem + ".png", stem + ".json"


def replot(output_dir, size, batch_size):
    csv_path, png_path, json_path = result_paths(output_dir, size, batch_size)
    rows = bench_utils.read_csv_rows(csv_path)
    with open(json_path) as handle:
        meta = json.load(handle)
    arguments = meta["arguments"]
    title = plot_title(size, arguments["dtype"], meta["new_tokens"], arguments["clock"], meta["machine"], batch_size)
    if plot(rows, png_path, title):
        print(f"wrote {png_path}")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu", help="model dims (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="same as --size quick")
    parser.add_argument("--scale-factors", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--batch-size", type=int, default=1, help="copies of the prompt per generate call (default 1)")
    parser.add_argument("--new-tokens", type=int, help="generated tokens per run (default 16, quick 3, 7b 32)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7, quick 2)")
    parser.add_argument("--no-vlora", dest="vlora", action="store_false", help="leave the VLoRA model out")
    bench_utils.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.size
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.replot:
        return replot(args.output_dir, size, args.batch_size)
    dims = SIZES[size]
    new_tokens = args.new_tokens or dims["new_tokens"]
    repeats = args.repeats or dims["repeats"]
    if new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the decode rate needs two token times)")
    if args.threads or size == "quick":
        torch.set_num_threads(args.threads or 1)
    device, dtype = bench_utils.check_device(torch.device(args.device)), bench_utils.DTYPES[args.dtype]
    element_bytes = torch.tensor([], dtype=dtype).element_size()
    sync = bench_utils.synchronizer(device)
    clock = bench_utils.get_clock(args.clock, device, torch.get_num_threads())
    info = bench_utils.machine_info(device)

    tokenizer = build_tiny_tokenizer()
    start = time.perf_counter()
    models = build_models(dims, tokenizer, args.scale_factors, device, dtype, args.seed,
                          size if args.vlora else None)
    build_s = time.perf_counter() - start
    baseline = models["mlp2x_gelu"]
    inputs = {name: prepare_inputs(tokenizer, model.config.image_seq_length, device, dtype, args.batch_size)
              for name, model in models.items() if name not in ("llava_native", "vlora")}
    if "vlora" in models:
        inputs["vlora"] = vlora_bench.prepare_vlora_inputs(tokenizer, QUESTION, synthesize_image(), device, dtype,
                                                           args.batch_size)
    inputs["llava_native"] = inputs["mlp2x_gelu"]
    text, vision = dims["text"], dims["vision"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    lm_params = sum(p.numel() for p in baseline.model.language_model.parameters()) + baseline.lm_head.weight.numel()
    tower_params = sum(p.numel() for p in baseline.model.vision_tower.parameters())
    print(f"machine: {bench_utils.describe_machine(info)}")
    print(f"dims ({size}): vision tower CLIP-shaped {vision['num_hidden_layers']} layers x {vision['hidden_size']} "
          f"(MLP {vision['intermediate_size']}, {vision['num_attention_heads']} heads), 336 px / patch 14 -> 24 x 24 "
          f"grid, {tower_params / 1e6:.1f} M params; language model LLaMA {text['num_hidden_layers']} layers x "
          f"{text['hidden_size']} (MLP {text['intermediate_size']}, {text['num_attention_heads']} heads, "
          f"{text['num_key_value_heads']} kv heads, vocab {text['vocab_size']}), {lm_params / 1e6:.1f} M params with "
          f"head; projector width {dims['projector_hidden_size']}; batch {args.batch_size}; {args.dtype} on {device}; "
          f"built in {build_s:.1f} s")
    print(f"attention: ours {baseline.config.text_config._attn_implementation}, llava "
          f"{models['llava_native'].config.text_config._attn_implementation}; generate {new_tokens} tokens greedy, "
          f"{repeats} timed rounds (median), {args.clock} clock")

    with torch.inference_mode():
        base_logits = baseline(**inputs["mlp2x_gelu"], logits_to_keep=1).logits.float()
        llava_logits = models["llava_native"](**inputs["llava_native"], logits_to_keep=1).logits.float()
        logit_diff = (base_logits - llava_logits).abs().max().item()
        samples = {name: [] for name in models}
        names = list(models)
        for round_index in range(args.warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                ttft, decode = timed_generate(models[name], inputs[name], new_tokens, sync, clock)
                encode = timed_encode(models[name], inputs[name]["pixel_values"], sync, clock)
                if round_index >= args.warmup:
                    samples[name].append((ttft, decode, encode))

    base_flops = analytic(dims, baseline.config, inputs["mlp2x_gelu"]["input_ids"].shape[1])
    base_ttft = [ttft for ttft, _, _ in samples["mlp2x_gelu"]]
    base_decode = [rate for _, rate, _ in samples["mlp2x_gelu"]]
    base_lm = [ttft - encode for ttft, _, encode in samples["mlp2x_gelu"]]
    rows = []
    for name, model in models.items():
        config = baseline.config if name == "llava_native" else model.config
        prompt_tokens = inputs[name]["input_ids"].shape[1]
        flops = analytic(dims, config, prompt_tokens)
        ttft = [t for t, _, _ in samples[name]]
        decode = [rate for _, rate, _ in samples[name]]
        encode = [e for _, _, e in samples[name]]
        lm_part = [t - e for t, _, e in samples[name]]
        speedups = [b / t for b, t in zip(base_ttft, ttft)]
        lm_speedups = [b / t for b, t in zip(base_lm, lm_part)]
        decode_ratios = [d / b for d, b in zip(decode, base_decode)]
        lm_ratio = base_flops["lm"] / flops["lm"]
        total_ratio = sum(base_flops.values()) / sum(flops.values())
        speedup = bench_utils.median(speedups)
        is_vlora = config.model_type == "vlora"
        image_tokens = 1 if is_vlora else config.image_seq_length  # VLoRA: the placeholder position
        visual_module = model.perceptual_weights_generator if is_vlora else getattr(model, "model", model).multi_modal_projector
        rows.append({
            "variant": name, "model_class": type(model).__name__,
            "projector": "vlora" if is_vlora else config.projector_type,
            "batch_size": args.batch_size,
            "scale_factor": config.scale_factor if getattr(config, "projector_type", "") == "tokenpacker" else "",
            "image_tokens": image_tokens, "prompt_tokens": prompt_tokens, "device": str(device), "dtype": args.dtype,
            "threads": torch.get_num_threads(), "clock": args.clock,
            "ttft_ms": bench_utils.median(ttft) * 1e3, "ttft_ms_p25": bench_utils.spread(ttft)[0] * 1e3,
            "ttft_ms_p75": bench_utils.spread(ttft)[1] * 1e3,
            "prefill_speedup_vs_mlp2x": speedup, "prefill_speedup_p25": bench_utils.spread(speedups)[0],
            "prefill_speedup_p75": bench_utils.spread(speedups)[1],
            "analytic_lm_prefill_ratio": lm_ratio, "speedup_fraction_of_lm_ratio": speedup / lm_ratio,
            "analytic_total_prefill_ratio": total_ratio, "speedup_fraction_of_total_ratio": speedup / total_ratio,
            "encode_ms": bench_utils.median(encode) * 1e3, "lm_part_ms": bench_utils.median(lm_part) * 1e3,
            "lm_part_speedup_vs_mlp2x": bench_utils.median(lm_speedups),
            "lm_part_fraction_of_lm_ratio": bench_utils.median(lm_speedups) / lm_ratio,
            "decode_tokens_per_s": bench_utils.median(decode),
            "decode_ratio_vs_mlp2x": bench_utils.median(decode_ratios),
            "decode_ratio_p25": bench_utils.spread(decode_ratios)[0],
            "decode_ratio_p75": bench_utils.spread(decode_ratios)[1],
            "kv_cache_bytes_per_image": kv_cache_bytes(text["num_hidden_layers"], text["num_key_value_heads"], head_dim,
                                                       image_tokens, element_bytes),
            "kv_cache_bytes_per_image_vicuna7b_fp16": kv_cache_bytes(
                VICUNA_7B["num_hidden_layers"], VICUNA_7B["num_key_value_heads"], VICUNA_7B["head_dim"],
                image_tokens, 2),
            "lm_prefill_gflop": flops["lm"] / 1e9, "vision_gflop": flops["vision"] / 1e9,
            "projector_gflop": flops["projector"] / 1e9,
            "visual_params_m": sum(param.numel() for param in visual_module.parameters()) / 1e6,
            "per_image_state_values": vlora_bench.perceptual_weight_values(config) if is_vlora else 0,
            "max_abs_logit_diff_vs_mlp2x": logit_diff if name == "llava_native" else "",
        })

    print()
    bench_utils.print_table([dict(r, kv_mib=r["kv_cache_bytes_per_image"] / 2**20) for r in rows], [
        ("variant", "variant", ""), ("image_tokens", "img tok", "d"), ("prompt_tokens", "prompt", "d"),
        ("ttft_ms", "TTFT ms", ".0f"), ("prefill_speedup_vs_mlp2x", "speed-up", ".2f"),
        ("analytic_lm_prefill_ratio", "LM limit", ".2f"), ("speedup_fraction_of_lm_ratio", "of LM", ".0%"),
        ("analytic_total_prefill_ratio", "total limit", ".2f"), ("speedup_fraction_of_total_ratio", "of total", ".0%"),
        ("encode_ms", "encode ms", ".0f"), ("lm_part_ms", "LM part ms", ".0f"),
        ("lm_part_speedup_vs_mlp2x", "LM speed-up", ".2f"), ("lm_part_fraction_of_lm_ratio", "of LM", ".0%"),
        ("decode_tokens_per_s", "decode tok/s", ".1f"), ("decode_ratio_vs_mlp2x", "vs base", ".3f"),
        ("kv_mib", "KV MiB/img", ".2f"), ("projector_gflop", "proj GFLOP", ".3g"),
        ("visual_params_m", "proj M params", ".2f"),
    ])
    print("\nnative LlavaForConditionalGeneration vs mlp2x_gelu baseline: "
          f"max |first-token logit diff| = {logit_diff:.2e}")
    print(f"analytic GFLOP per prefill: vision tower {base_flops['vision'] / 1e9:.3g}, language model "
          + ", ".join(f"{r['variant']} {r['lm_prefill_gflop']:.3g}" for r in rows if r["variant"] != "llava_native"))
    print("KV cache per image with Vicuna-7B dims in fp16 (analytic): "
          + ", ".join(f"{r['image_tokens']} tokens {r['kv_cache_bytes_per_image_vicuna7b_fp16'] / 2**20:.0f} MiB"
                      for r in rows if r["variant"] != "llava_native"))
    packed = [r for r in rows if r["projector"] == "tokenpacker"]
    for r in rows:
        if r["projector"] == "vlora":
            print(f"VLoRA: no visual tokens (1 placeholder position), generator {r['visual_params_m']:.2f} M params and "
                  f"{r['projector_gflop']:.3g} GFLOP per image, {r['per_image_state_values']} A values per image; "
                  f"prefill speed-up {r['prefill_speedup_vs_mlp2x']:.2f} (LM-only limit "
                  f"{r['analytic_lm_prefill_ratio']:.2f}, whole-prefill limit {r['analytic_total_prefill_ratio']:.2f}), "
                  f"decode {r['decode_ratio_vs_mlp2x']:.3f} x baseline")
    print("\ntargets" + (" (toy dims: the targets are meant for the full run)" if size == "quick" else "") + ":")
    for r in packed:
        print(f"  {r['variant']}: prefill speed-up {r['prefill_speedup_vs_mlp2x']:.2f} = "
              f"{r['speedup_fraction_of_lm_ratio']:.0%} of the LM-only limit {r['analytic_lm_prefill_ratio']:.2f} "
              f"(>= 85%: {'met' if r['speedup_fraction_of_lm_ratio'] >= 0.85 else 'MISSED'}; "
              f"{r['speedup_fraction_of_total_ratio']:.0%} of the whole-prefill limit "
              f"{r['analytic_total_prefill_ratio']:.2f}; TTFT minus image encoding: "
              f"{r['lm_part_speedup_vs_mlp2x']:.2f} = {r['lm_part_fraction_of_lm_ratio']:.0%} of the LM-only limit); "
              f"decode {r['decode_ratio_vs_mlp2x']:.3f} x baseline "
              f"(within 5% or faster: {'met' if r['decode_ratio_vs_mlp2x'] >= 0.95 else 'MISSED'})")

    csv_path, png_path, json_path = result_paths(args.output_dir, size, args.batch_size)
    bench_utils.write_csv(csv_path, [{key: row[key] for key in CSV_COLUMNS} for row in rows])
    bench_utils.write_json(json_path, {"benchmark": "end_to_end", "machine": info, "arguments": bench_utils.portable_arguments(args),
                                       "dims": dims, "new_tokens": new_tokens, "repeats": repeats,
                                       "question": QUESTION, "build_seconds": build_s})
    print(f"wrote {csv_path} and {json_path}")
    if plot(rows, png_path, plot_title(size, args.dtype, new_tokens, args.clock, info, args.batch_size)):
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""torch.compile and the static KV cache: graph breaks, greedy tokens and decode speed against eager, in one run.

    python benchmarks/compiled_decode.py                  # CPU-sized model (end_to_end.py's "cpu" dims), minutes
    python benchmarks/compiled_decode.py --quick          # toy dims, seconds plus compilation (smoke test)
    python benchmarks/compiled_decode.py --size 7b --device cuda --dtype bfloat16

One TokenPacker model (scale 2). First `torch._dynamo.explain` counts the graph breaks of a decode step (one new
token against a filled cache) and of the prefill (pixel values, vision tower, projector, language model), with the
reason and place of each. Then `generate` runs greedily with `cache_implementation="static"`, eagerly and with the
model's forward compiled by `torch.compile` (`--backend`, `--mode`; compiled once before the timed rounds); the
tokens of both are compared and the decode rate of each is taken from a streamer's timestamps, alternating eager
and compiled rounds. Writes compiled_decode.json to benchmarks/results/ (or --output-dir).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402
from end_to_end import SIZES, TokenTimes, build_config, default_dtype, prepare_inputs, set_generation_ids  # noqa: E402

bench_utils.add_repo_to_path()
from modeling_tokenpacker import TokenPackerForConditionalGeneration  # noqa: E402
from modeling_tokenpacker.demo import build_tiny_tokenizer  # noqa: E402


def cache_field(output):
    """Name of the KV cache in an output of the installed release (`cache` from 5.24, `past_key_values` before)."""
    return "cache" if "cache" in output else "past_key_values"


def count_graph_breaks(model, inputs):
    """{step: (count, [reason at place])} for a decode step and for the prefill."""
    with torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        field = cache_field(prefill)
        next_token = prefill.logits[:, -1:].argmax(-1)
        decode_inputs = {"input_ids": next_token, field: prefill[field], "use_cache": True,
                         "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(next_token)], 1)}
        results = {}
        for step, step_inputs in (("decode", decode_inputs), ("prefill", dict(inputs, use_cache=False))):
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(**step_inputs)
            places = []
            for reason in explanation.break_reasons:
                frame = reason.user_stack[-1] if reason.user_stack else None
                where = f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame else "?"
                places.append(f"{str(reason.reason).splitlines()[0]} at {where}")
            results[step] = (explanation.graph_break_count, places)
    torch._dynamo.reset()
    return results


def timed_static_generate(model, inputs, new_tokens, sync, clock):
    """(tokens, seconds to the first token, decode tokens/s) of one greedy static-cache generate call."""
    streamer = TokenTimes(sync, clock)
    sync()
    start = clock()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                cache_implementation="static", streamer=streamer)
    times = streamer.times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return output[:, inputs["input_ids"].shape[1]:].tolist(), times[0] - start, decode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--quick", action="store_true", help="the toy dims of --size quick")
    parser.add_argument("--new-tokens", type=int, help="tokens per generate call (default: the size's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each (eager, compiled)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--mode", default=None, help="torch.compile mode (e.g. reduce-overhead on a GPU)")
    bench_utils.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    size = "quick" if args.quick else args.size
    dims = SIZES[size]
    new_tokens = args.new_tokens or dims["new_tokens"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = bench_utils.check_device(torch.device(args.device)), bench_utils.DTYPES[args.dtype]
    sync, clock = bench_utils.synchronizer(device), bench_utils.get_clock(args.clock, device, torch.get_num_threads())
    info = bench_utils.machine_info(device)
    print(f"machine: {bench_utils.describe_machine(info)}")

    tokenizer = build_tiny_tokenizer()
    with default_dtype(dtype), torch.device(device):
        torch.manual_seed(args.seed)
        model = TokenPackerForConditionalGeneration(build_config(dims, tokenizer, "tokenpacker", 2)).eval()
    set_generation_ids(model, tokenizer)
    inputs = prepare_inputs(tokenizer, model.config.image_seq_length, device, dtype)

    breaks = count_graph_breaks(model, inputs)
    for step, (count, places) in breaks.items():
        print(f"graph breaks, {step} step: {count}" + "".join(f"\n  {place}" for place in places))

    eager_forward = model.forward
    compiled_forward = torch.compile(eager_forward, backend=args.backend, mode=args.mode)
    start = time.perf_counter()
    model.forward = compiled_forward
    compiled_tokens, _, _ = timed_static_generate(model, inputs, new_tokens, sync, clock)  # compiles
    compile_seconds = time.perf_counter() - start
    model.forward = eager_forward
    eager_tokens, _, _ = timed_static_generate(model, inputs, new_tokens, sync, clock)
    rates = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, forward in (("eager", eager_forward), ("compiled", compiled_forward)):
            model.forward = forward
            tokens, _, rate = timed_static_generate(model, inputs, new_tokens, sync, clock)
            assert tokens == (eager_tokens if name == "eager" else compiled_tokens)
            rates[name].append(rate)
    model.forward = eager_forward
    eager_rate, compiled_rate = statistics.median(rates["eager"]), statistics.median(rates["compiled"])
    print(f"static-cache greedy tokens, eager == compiled: {eager_tokens == compiled_tokens} ({new_tokens} tokens)")
    print(f"first compiled generate (compilation included): {compile_seconds:.1f} s")
    print(f"decode tokens/s (median of {args.repeats}): eager {eager_rate:.1f}, compiled {compiled_rate:.1f} "
          f"({compiled_rate / eager_rate:.2f}x)")

    _, _, json_path = bench_utils.output_paths(args.output_dir, "compiled_decode", args.quick)
    bench_utils.write_json(json_path, {
        "machine": info, "arguments": bench_utils.portable_arguments(args), "size": size, "dims": dims,
        "graph_breaks": {step: {"count": count, "places": places} for step, (count, places) in breaks.items()},
        "tokens_equal": eager_tokens == compiled_tokens, "new_tokens": new_tokens,
        "compile_seconds": compile_seconds, "decode_tokens_per_s": {"eager": rates["eager"],
                                                                   "compiled": rates["compiled"]},
        "median_decode_tokens_per_s": {"eager": eager_rate, "compiled": compiled_rate},
    })
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What computing the vision tower only as deep as the projector reads would save.

    python benchmarks/vision_tower_depth.py --threads 1 --clock cpu      # CLIP ViT-L/14-336 dims, random weights

TokenPacker reads hidden states 12, 16, 22, 23 and -2 (= 23) of CLIP-L's 24 layers, so the 24th layer and the
post-layernorm are computed and never used (they get no gradient either). This times the tower forward, as
`get_image_features` runs it (every hidden state kept), at full depth and cut after the deepest layer read, in
alternating rounds, and prints the saving per image and as a share of the tower. Writes vision_tower_depth.json to
benchmarks/results/ (or --output-dir).
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402

bench_utils.add_repo_to_path()
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

from modeling_tokenpacker import TokenPackerConfig  # noqa: E402

CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": 336, "patch_size": 14, "projection_dim": 768, "hidden_act": "quick_gelu"}


def deepest_layer_read(config):
    """The largest hidden-state index the projector reads (index 0 is the embeddings' output)."""
    depth = config.vision_config.num_hidden_layers
    layers = [config.vision_feature_layer, *config.region_feature_layers]
    return max(layer % (depth + 1) for layer in layers)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a narrow tower (width 64), seconds")
    bench_utils.add_timing_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = bench_utils.check_device(torch.device(args.device)), bench_utils.DTYPES[args.dtype]
    sync, clock = bench_utils.synchronizer(device), bench_utils.get_clock(args.clock, device, torch.get_num_threads())
    info = bench_utils.machine_info(device)
    print(f"machine: {bench_utils.describe_machine(info)}")

    dims = dict(CLIP_L_336, **({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
                               if args.quick else {}))
    config = TokenPackerConfig(vision_config=dict(dims, model_type="clip_vision_model"))
    needed = deepest_layer_read(config)
    torch.manual_seed(args.seed)
    full = CLIPVisionModel(CLIPVisionConfig(**dims)).to(device, dtype).eval()
    cut = CLIPVisionModel(CLIPVisionConfig(**dict(dims, num_hidden_layers=needed))).to(device, dtype).eval()
    pixels = torch.randn(args.batch_size, 3, 336, 336, device=device, dtype=dtype)

    def run(model):
        with torch.no_grad():
            model(pixels, output_hidden_states=True)

    times = bench_utils.time_interleaved({"full": lambda: run(full), "cut": lambda: run(cut)}, args.repeats,
                                         warmup=args.warmup, sync=sync, clock=clock)
    full_s, cut_s = bench_utils.median(times["full"]), bench_utils.median(times["cut"])
    saving = full_s - cut_s
    print(f"layers computed: {dims['num_hidden_layers']} (full) vs {needed} (deepest read)")
    print(f"tower forward per batch of {args.batch_size}: full {full_s * 1000:.1f} ms, cut {cut_s * 1000:.1f} ms; "
          f"saving {saving * 1000:.1f} ms = {saving / full_s:.1%} of the tower")
    _, _, json_path = bench_utils.output_paths(args.output_dir, "vision_tower_depth", args.quick)
    bench_utils.write_json(json_path, {"machine": info, "arguments": bench_utils.portable_arguments(args),
                                       "dims": dims, "layers_needed": needed, "seconds": times,
                                       "median_seconds": {"full": full_s, "cut": cut_s},
                                       "saving_fraction_of_tower": saving / full_s})
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

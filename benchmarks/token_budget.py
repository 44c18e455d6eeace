"""Visual-token budget of TokenPacker-HD ('slice' mode): block grid and tokens the language model sees per image.

    python benchmarks/token_budget.py                 # table + benchmarks/results/token_budget.{csv,json,png}
    python benchmarks/token_budget.py --output-dir D  # elsewhere

For each image size (width x height) and each `patch_num` (9, 16, 25) x `scale_factor` (2, 3, 4; 144, 64 and 36
tokens per 336-px block) it prints the grid the image processor chooses (`choose_block_grid`, the original's
patch-table score) and the visual tokens of one image as the language model sees them: the image tokens of every
block and of the global view plus the `,`/`\\n` separator tokens between them. The count is the length of the
processor's own placeholder sequence (`TokenPackerProcessor.image_placeholder_ids`), checked against the formula
`L*(blocks + g) + rows*(cols-1) + rows + g`, g = 1 when there is more than one block.

It also prints the average over a fixed sample of varied aspect ratios next to the paper's reported averages
(~954 tokens for 9 blocks at max 1088 px, ~1393 for 16 blocks at max 1344 px, scale 2). The sample: long side in
SAMPLE_LONG_SIDES, width:height in SAMPLE_ASPECTS (both orientations), every combination; the paper's own averages
come from its evaluation images, so the two are comparable in size, not equal. No pixels are processed: the grid
depends on the image size only. The plot (PNG) needs matplotlib; without it the script says so and writes the CSV.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_utils  # noqa: E402

bench_utils.add_repo_to_path()

from modeling_tokenpacker.image_processing_tokenpacker import choose_block_grid  # noqa: E402

SIZES = [(336, 336), (672, 672), (1088, 1088), (1344, 1344), (2000, 500), (500, 2000)]  # (width, height)
PATCH_NUMS = (9, 16, 25)
SCALE_FACTORS = (2, 3, 4)
GRID = 24  # CLIP-L/14 at 336 px
SAMPLE_LONG_SIDES = (480, 640, 800, 1024, 1280, 1600, 2048)
SAMPLE_ASPECTS = ((1, 1), (5, 4), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1))
PAPER_AVERAGES = {(9, 2): 954, (16, 2): 1393}  # (patch_num, scale_factor) -> tokens, TokenPacker paper (HD rows)
COLUMNS = [
    ("size", "size (WxH)", ""),
    ("patch_num", "patch_num", "d"),
    ("scale_factor", "scale", "d"),
    ("tokens_per_block", "tok/block", "d"),
    ("grid", "grid (rows x cols)", ""),
    ("blocks", "blocks", "d"),
    ("global_view", "global", "d"),
    ("separators", "separators", "d"),
    ("visual_tokens", "visual tokens", "d"),
]


def sample_sizes():
    """(width, height) of the averaging sample: every long side x aspect ratio, landscape and portrait."""
    sizes = []
    for long_side in SAMPLE_LONG_SIDES:
        for wide, high in SAMPLE_ASPECTS:
            short_side = max(1, round(long_side * high / wide))
            sizes.append((long_side, short_side))
            if wide != high:
                sizes.append((short_side, long_side))
    return sizes


def build_processors():
    """scale_factor -> a processor whose `image_placeholder_ids` gives the LM's view of an image (tiny tokenizer:
    the counts do not depend on the vocabulary)."""
    from modeling_tokenpacker import TokenPackerImageProcessor, TokenPackerProcessor
    from modeling_tokenpacker.demo import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return {s: TokenPackerProcessor(TokenPackerImageProcessor(image_aspect_ratio="slice"), tokenizer,
                                    image_seq_length=(GRID // s) ** 2) for s in SCALE_FACTORS}


def budget(width, height, patch_num, scale_factor, processor):
    rows, cols = choose_block_grid(height, width, patch_num)
    tokens_per_block = (GRID // scale_factor) ** 2
    blocks = rows * cols
    global_view = int(blocks > 1)
    separators = rows * (cols - 1) + rows + global_view
    visual_tokens = len(processor.image_placeholder_ids((rows, cols)))
    formula = tokens_per_block * (blocks + global_view) + separators
    if visual_tokens != formula:
        raise AssertionError(f"processor gives {visual_tokens} positions for {rows}x{cols}, the formula {formula}")
    return {"size": f"{width}x{height}", "width": width, "height": height, "patch_num": patch_num,
            "scale_factor": scale_factor, "tokens_per_block": tokens_per_block, "grid": f"{rows}x{cols}",
            "rows": rows, "cols": cols, "blocks": blocks, "global_view": global_view, "separators": separators,
            "visual_tokens": visual_tokens}


def run(output_dir=bench_utils.RESULTS_DIR, plot=True):
    processors = build_processors()
    rows = [budget(w, h, p, s, processors[s]) for (w, h) in SIZES for p in PATCH_NUMS for s in SCALE_FACTORS]
    print("Visual tokens per image in 'slice' mode (image tokens + separators, as the language model sees them):")
    bench_utils.print_table(rows, COLUMNS)

    sample = sample_sizes()
    averages = []
    for p in PATCH_NUMS:
        for s in SCALE_FACTORS:
            counts = [budget(w, h, p, s, processors[s])["visual_tokens"] for (w, h) in sample]
            averages.append({"patch_num": p, "scale_factor": s, "sample_images": len(sample),
                             "mean_visual_tokens": sum(counts) / len(counts), "min": min(counts), "max": max(counts),
                             "paper_average": PAPER_AVERAGES.get((p, s), "")})
    print(f"\nAverage over the sample ({len(sample)} sizes: long side {list(SAMPLE_LONG_SIDES)} x width:height "
          f"{[f'{a}:{b}' for a, b in SAMPLE_ASPECTS]}, landscape and portrait):")
    bench_utils.print_table(averages, [("patch_num", "patch_num", "d"), ("scale_factor", "scale", "d"),
                                       ("mean_visual_tokens", "mean tokens", ".1f"), ("min", "min", "d"),
                                       ("max", "max", "d"), ("paper_average", "paper (avg)", "")])

    os.makedirs(output_dir, exist_ok=True)
    csv_path = os.path.join(output_dir, "token_budget.csv")
    bench_utils.write_csv(csv_path, rows)
    averages_path = os.path.join(output_dir, "token_budget_averages.csv")
    bench_utils.write_csv(averages_path, averages)
    bench_utils.write_json(os.path.join(output_dir, "token_budget.json"), {
        "sample": {"long_sides": list(SAMPLE_LONG_SIDES), "aspects_w_h": [list(a) for a in SAMPLE_ASPECTS],
                   "sizes_w_h": [list(size) for size in sample]},
        "paper_averages": {f"patch_num={p},scale={s}": v for (p, s), v in PAPER_AVERAGES.items()},
    })
    print(f"\nwrote {csv_path} and {averages_path}")
    png = None
    if plot:
        png = plot_budget(rows, os.path.join(output_dir, "token_budget.png"))
    return rows, averages, png


def plot_budget(rows, path):
    plt = bench_utils.import_pyplot()  # lazily: matplotlib is optional
    if plt is None:
        return None
    sizes = list(dict.fromkeys(row["size"] for row in rows))
    figure, axes = plt.subplots(1, len(SCALE_FACTORS), figsize=(5 * len(SCALE_FACTORS), 4), sharey=False)
    width = 0.8 / len(PATCH_NUMS)
    for axis, scale in zip(axes, SCALE_FACTORS):
        for index, patch_num in enumerate(PATCH_NUMS):
            values = [next(r["visual_tokens"] for r in rows if r["size"] == size and r["patch_num"] == patch_num
                           and r["scale_factor"] == scale) for size in sizes]
            axis.bar([i + index * width for i in range(len(sizes))], values, width, label=f"patch_num {patch_num}")
        axis.set_xticks([i + width for i in range(len(sizes))])
        axis.set_xticklabels(sizes, rotation=30)
        axis.set_title(f"scale {scale} ({(GRID // scale) ** 2} tokens/block)")
        axis.set_ylabel("visual tokens per image")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=bench_utils.RESULTS_DIR)
    parser.add_argument("--no-plot", action="store_true", help="write the CSV only")
    args = parser.parse_args(argv)
    run(args.output_dir, plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Convert an original VLoRA (FeipengMa6/VLoRA, a LLaVA-1.5 fork) checkpoint to the 🤗 transformers VLoRA format.

    python conversion/convert_vlora_to_hf.py --input VLoRA-7b-v1 --vision-tower clip-vit-large-patch14-336 \
        --output vlora-7b-hf [--tokenizer DIR] [--dtype float16|bfloat16|float32] [--max-shard-size 5GB] \
        [--overwrite] [--push-to-hub REPO_ID [--private]] [--no-verify] [--preset NAME]
    python conversion/convert_vlora_to_hf.py --projector-only mm_projector.bin \
        --base-llm LLM_DIR --vision-tower CLIP_DIR --output OUT_DIR ...

The output folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`. The
options, the streaming, the checks, the atomic output and the verification are those of
`convert_tokenpacker_to_hf.py` (see `conversion/README.md`, "VLoRA"). Errors are one line on stderr (exit status 2).
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python conversion/convert_vlora_to_hf.py`
    sys.path.insert(0, str(REPO_ROOT))

from conversion import cli  # noqa: E402


def convert(output, **options):
    """`conversion.vlora_converter.convert`, imported on first use (so that `--help` answers at once)."""
    from conversion.vlora_converter import convert as run

    return run(output, **options)


def build_parser():
    return cli.build_parser(
        prog="convert_vlora_to_hf.py",
        description="Convert an original VLoRA (LLaVA-1.5 fork) checkpoint to the transformers format.",
    )


def main(argv=None):
    return cli.run(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Convert an original TokenPacker (LLaVA-1.5 fork) checkpoint to the 🤗 transformers TokenPacker format.

    python conversion/convert_tokenpacker_to_hf.py --input ORIG_DIR --output OUT_DIR \
        [--vision-tower CLIP_DIR] [--tokenizer DIR] [--dtype float16|bfloat16|float32] \
        [--max-shard-size 5GB] [--overwrite] [--push-to-hub REPO_ID [--private]] [--no-verify] [--preset NAME]
    python conversion/convert_tokenpacker_to_hf.py --projector-only mm_projector.bin \
        --base-llm LLM_DIR --vision-tower CLIP_DIR --output OUT_DIR ...

The output folder loads with `AutoModelForImageTextToText` / `AutoProcessor` and `trust_remote_code=True`. Weights
are streamed one source shard at a time; every source tensor is mapped (see `conversion/README.md`) or on the
documented ignore list, and an unknown tensor name is an error. The output is written to a staging folder beside it
and swapped into place only when complete and (by default) verified bit for bit in a fresh process; a failed,
interrupted or killed run leaves the output as it was. Errors are one line on stderr (exit status 2).
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python conversion/convert_tokenpacker_to_hf.py`
    sys.path.insert(0, str(REPO_ROOT))

from conversion import cli  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402


def build_parser():
    return cli.build_parser(
        prog="convert_tokenpacker_to_hf.py",
        description="Convert an original TokenPacker (LLaVA-1.5 fork) checkpoint to the transformers format.",
    )


def main(argv=None):
    return cli.run(build_parser(), convert, argv)


if __name__ == "__main__":
    sys.exit(main())

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

import argparse
import logging
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as `python conversion/convert_tokenpacker_to_hf.py`
    sys.path.insert(0, str(REPO_ROOT))

from conversion.common import DTYPES, ConversionError, describe_os_error, one_line  # noqa: E402
from conversion.tokenpacker_converter import convert  # noqa: E402

def build_parser():
    parser = argparse.ArgumentParser(
        prog="convert_tokenpacker_to_hf.py",
        description="Convert an original TokenPacker (LLaVA-1.5 fork) checkpoint to the transformers format.",
    )
    source = parser.add_argument_group("source")
    source.add_argument("--input", help="original checkpoint folder (or Hub id): config.json + weights")
    source.add_argument("--projector-only", help="a stage-1 mm_projector.bin (its config.json beside it)")
    source.add_argument("--base-llm", help="with --projector-only: the LLaMA/Vicuna folder the projector was trained on")
    source.add_argument("--vision-tower", help="CLIP folder or Hub id (CLIPVisionModel or CLIPModel); preferred over "
                                               "a copy embedded in the checkpoint, as the original does")
    source.add_argument("--tokenizer", help="tokenizer folder (default: the input folder, else --base-llm)")
    source.add_argument("--preset", help="a family from configuration/ (default: auto-detected when exactly one fits)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, help="output folder (written atomically)")
    out.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: the config's torch_dtype)")
    out.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB")
    out.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    out.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the output folder to this Hub repository")
    out.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    out.add_argument("--no-verify", dest="verify", action="store_false",
                     help="skip reloading the output in a fresh process and comparing every tensor")
    out.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.input is None and args.projector_only is None:
        parser.error("one of --input or --projector-only is required")
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    try:
        result = convert(args.output, input=args.input, projector_only=args.projector_only, base_llm=args.base_llm,
                         vision_tower=args.vision_tower, tokenizer=args.tokenizer, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, overwrite=args.overwrite, push_to_hub=args.push_to_hub,
                         private=args.private, verify=args.verify, preset=args.preset, progress=args.progress)
    except ConversionError as error:
        print(f"error: {one_line(error, 2000)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {describe_os_error(error, 'converting')}; {os.path.abspath(args.output)} is as it was.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {os.path.abspath(args.output)} is as it was; temporary files removed.", file=sys.stderr)
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

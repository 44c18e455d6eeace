"""The command line every family's converter shares (`convert_tokenpacker_to_hf.py`, `convert_vlora_to_hf.py`): the
same options, one-line errors on stderr (exit status 2), the summary on stdout."""

import argparse
import logging
import os
import sys

from .common import DTYPES, ConversionError, describe_os_error, one_line


def build_parser(prog, description):
    parser = argparse.ArgumentParser(prog=prog, description=description)
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


def run(parser, convert, argv=None):
    """Parse `argv` with `parser`, call `convert(output, **options)` and report; returns the exit status."""
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

"""What every converter shares: the error type, dtypes, sizes, JSON, hashing, input locations and their checks.

Never imports `modeling_tokenpacker` at import time (the verification child imports this package while the
checkpoint's own remote code, not the package, must serve the model).
"""

import hashlib
import json
import os
from pathlib import Path

import torch

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHECKPOINT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                       "pytorch_model*.bin", "pytorch_model.bin.index.json", "mm_projector.bin", "tokenizer*",
                       "special_tokens_map.json", "added_tokens.json"]
CLIP_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "model.safetensors.index.json",
                 "pytorch_model*.bin", "pytorch_model.bin.index.json"]
TOKENIZER_PATTERNS = ["tokenizer*", "special_tokens_map.json", "added_tokens.json"]
PRESET_DIR = Path(__file__).resolve().parent.parent / "configuration"


class ConversionError(ValueError):
    """A conversion that cannot proceed; the message (one line) says what was expected and what was found."""


def one_line(text, limit=400):
    """`text` with its whitespace runs (newlines included) folded into single spaces, cut at `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_size(value):
    """'5GB', '500MB', '10KiB', '1234' -> bytes, with transformers' own parser (the one `save_pretrained`'s
    `max_shard_size` goes through: KB/MB/GB decimal, KiB/MiB/GiB binary)."""
    from transformers.utils.hub import convert_file_size_to_int

    text = str(value).strip()
    try:
        size = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        raise ConversionError(f"--max-shard-size must look like '5GB', '500MB', '10KiB' or a byte count; "
                              f"got {value!r}.") from None
    if size < 1:
        raise ConversionError(f"--max-shard-size must be positive; got {value!r}.")
    return size


def dtype_name(dtype):
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConversionError(f"dtype must be one of {sorted(DTYPES)}; got {dtype!r}.")


def resolve_dtype(value):
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if value not in DTYPES:
        raise ConversionError(f"dtype must be one of {sorted(DTYPES)}; got {value!r}.")
    return value


def set_config_dtype(config, dtype):
    """The dtype a config records: `dtype` in transformers 5.x, `torch_dtype` in 4.x (5.x keeps the old name only as
    a deprecated alias)."""
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def read_json(path):
    """The JSON in `path`; a one-line ConversionError naming the file when it is unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                              "expected the file as the original checkpoint wrote it.") from None
    except UnicodeDecodeError as error:
        raise ConversionError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start}); expected JSON.") from None
    except OSError as error:
        raise ConversionError(f"{path} cannot be read: {error.strerror or error}.") from None


def load_family_presets(family, default_family="tokenpacker"):
    """{name: preset dict} of configuration/*.json whose `family` is `family` (a preset without the key belongs to
    `default_family`)."""
    presets = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        preset = read_json(path)
        if preset.get("family", default_family) == family:
            presets[preset.get("name", path.stem)] = preset
    return presets


def write_json(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def round_up(value, multiple):
    return -(-value // multiple) * multiple


def looks_like_hub_id(value):
    """Whether `value` has the form of a Hub repository id (checked with huggingface_hub's own validator)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    value = str(value)
    if value.count("/") != 1 or value.startswith((".", "/")):
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def resolve_location(value, what, allow_patterns=None):
    """A local folder (or file) as is; a Hub id through `huggingface_hub.snapshot_download`."""
    if value is None:
        return None
    if os.path.exists(value):
        return os.path.abspath(value)
    if not looks_like_hub_id(value):
        raise ConversionError(f"{what}: {value!r} is neither an existing path nor a Hub repository id.")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id=value, allow_patterns=allow_patterns)
    except Exception as error:  # network, authentication, missing repo
        raise ConversionError(f"{what}: {value!r} is not a local path and could not be downloaded from the Hub "
                              f"({type(error).__name__}: {one_line(error, 200)}).") from error


def check_output_apart_from_inputs(output, inputs):
    """ConversionError when the output folder is, contains or lies inside one of `inputs` ({what: path}), whatever
    the flags: replacing it would delete the source, and writing into it would change it. Paths are compared after
    resolving symbolic links."""
    out = os.path.realpath(output)
    for what, path in inputs.items():
        if path is None:
            continue
        source = os.path.realpath(path)
        if out == source:
            relation = "is"
        elif source.startswith(out.rstrip(os.sep) + os.sep):
            relation = "contains"
        elif out.startswith(source.rstrip(os.sep) + os.sep):
            relation = "lies inside"
        else:
            continue
        raise ConversionError(f"The output {output} {relation} {what} {path}: choose an output folder outside every "
                              "input (nothing was written).")


def check_free_space(folder, needed_bytes, margin=1.02):
    """ConversionError when the filesystem of `folder` has less than `needed_bytes` (times `margin`) free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if free < needed_bytes * margin:
        raise ConversionError(f"Not enough free space for the output beside {folder}: it needs about "
                              f"{needed_bytes / 1e6:.1f} MB and the filesystem has {free / 1e6:.1f} MB free "
                              "(nothing was written).")


def folder_of(path):
    """The folder a location names: itself, or the folder holding a file."""
    return path if path is None or os.path.isdir(path) else os.path.dirname(path)


def describe_os_error(error, doing):
    """A one-line description of an OSError met while `doing` something (e.g. 'writing the output')."""
    where = f" ({error.filename})" if getattr(error, "filename", None) else ""
    reason = error.strerror or one_line(error, 200) or type(error).__name__
    if getattr(error, "errno", None) == 28:
        reason = "no space left on the device"
    return f"{reason}{where} while {doing}"


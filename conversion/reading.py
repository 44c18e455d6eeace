"""Reading original checkpoints safely: weight files found, checked complete before anything is read, tensors
streamed one file at a time (`.bin` only through `torch.load(weights_only=True)`, memory-mapped)."""

import json
import os
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .common import ConversionError, one_line, read_json

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


@dataclass
class SourceFile:
    """One weight file: its path, format ('safetensors' or 'bin') and role (e.g. checkpoint, base_llm, vision,
    projector)."""

    path: str
    fmt: str
    role: str


def find_weight_files(folder, role, description):
    """The weight files of a folder: an index (safetensors first, then .bin), a single file, or shards without an
    index. Other files (training_args.bin, optimizer states) are never looked at. Returns (files, index_map);
    `description` names the folder in errors (e.g. 'the CLIP vision tower (--vision-tower)')."""
    folder = str(folder)
    for index_name, fmt in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index_path = os.path.join(folder, index_name)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no 'weight_map' (expected {{tensor name: shard file}}).")
            names = list(OrderedDict.fromkeys(weight_map.values()))
            missing = [name for name in names if not os.path.isfile(os.path.join(folder, name))]
            if missing:
                raise ConversionError(f"{index_path} names shard files that are missing: {missing}.")
            return [SourceFile(os.path.join(folder, name), fmt, role) for name in names], weight_map
    for single, fmt in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if os.path.isfile(os.path.join(folder, single)):
            return [SourceFile(os.path.join(folder, single), fmt, role)], None
    for pattern, fmt in ((r"model-(\d+)-of-(\d+)\.safetensors", "safetensors"), (r"pytorch_model-(\d+)-of-(\d+)\.bin", "bin")):
        shards = sorted(name for name in os.listdir(folder) if re.fullmatch(pattern, name))
        if shards:
            total = int(re.fullmatch(pattern, shards[0]).group(2))
            if len(shards) != total:
                raise ConversionError(f"{folder} has {len(shards)} shards matching {pattern!r} but their names say "
                                      f"{total}; expected all of them (or an index file).")
            return [SourceFile(os.path.join(folder, name), fmt, role) for name in shards], None
    raise ConversionError(
        f"No weights found in {folder} ({description}): expected model.safetensors, "
        "model.safetensors.index.json + shards, pytorch_model.bin, pytorch_model.bin.index.json + shards, or "
        "model-XXXXX-of-YYYYY.safetensors / pytorch_model-XXXXX-of-YYYYY.bin shards."
    )


def check_safetensors_file(path):
    """ConversionError unless `path` is a complete safetensors file: a readable header whose tensors' byte ranges
    end exactly where the file ends (a truncated download or copy fails here, before any tensor is read)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path} is truncated: {size} bytes, not even a safetensors header length.")
            (length,) = struct.unpack("<Q", prefix)
            if 8 + length > size:
                raise ConversionError(f"{path} is truncated: its header says {length} bytes of header but the file "
                                      f"has {size} bytes in all.")
            header = json.loads(handle.read(length))
    except (UnicodeDecodeError, ValueError) as error:
        if isinstance(error, ConversionError):
            raise
        raise ConversionError(f"{path} is not a safetensors file: its header is not JSON ({one_line(error, 120)}).") from None
    except OSError as error:
        raise ConversionError(f"{path} cannot be read: {error.strerror or error}.") from None
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
            expected = SAFETENSORS_DTYPE_BYTES.get(info["dtype"])
            count = 1
            for dim in info["shape"]:
                count *= dim
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path} has a malformed header entry for {name!r}: {one_line(info, 120)}.") from None
        if expected is not None and stop - begin != expected * count:
            raise ConversionError(f"{path}: tensor {name!r} takes {stop - begin} bytes in the header but its shape "
                                  f"{info['shape']} and dtype {info['dtype']} need {expected * count}.")
        end = max(end, stop)
    if 8 + length + end != size:
        raise ConversionError(f"{path} is truncated or padded: the header describes {8 + length + end} bytes but the "
                              f"file has {size}.")


def check_complete(source):
    """What can be checked of one weight file before reading it: safetensors files completely, `.bin` files open."""
    if not os.access(source.path, os.R_OK):
        raise ConversionError(f"{source.path} is not readable (permission denied).")
    if source.fmt == "safetensors":
        check_safetensors_file(source.path)
    elif os.path.getsize(source.path) == 0:
        raise ConversionError(f"{source.path} is empty; expected a PyTorch state dict.")


def load_bin(path):
    """A `.bin` state dict, safely: `weights_only=True` (no arbitrary code) and memory-mapped when possible."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error).lower():
                raise
            # the legacy (pre-zip) serialization cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error).lower():
            raise ConversionError(
                f"Refusing to load {path}: it is not a plain tensor state dict and unpickling it would need arbitrary "
                f"code (torch.load(weights_only=True) says: {one_line(str(error).splitlines()[-1], 300)}). Only load "
                "such a file if you trust it, e.g. re-save its tensors with safetensors in a trusted environment."
            ) from error
        raise ConversionError(f"Could not read {path} as a PyTorch state dict (truncated or not a torch.save file?): "
                              f"{type(error).__name__}: {one_line(error, 200)}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a {{name: tensor}} state dict.")
    return state


def iter_file_tensors(source):
    """(name, tensor) for every tensor of one file, one file in memory (memory-mapped) at a time."""
    if source.fmt == "safetensors":
        with safe_open(source.path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)
    else:
        state = load_bin(source.path)
        for name in list(state):
            yield name, state.pop(name)
        del state


def scan_file(source):
    """{name: (shape, dtype)} of one file without reading its data."""
    if source.fmt == "safetensors":
        info = {}
        with safe_open(source.path, framework="pt") as handle:
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                info[name] = (tuple(tensor_slice.get_shape()), str(tensor_slice.get_dtype()))
        return info
    state = load_bin(source.path)
    return {name: (tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")) for name, tensor in state.items()}


def scan_sources(groups, roles):
    """Shapes of every tensor of `groups` ([(files, index map or None)]), checked against the index files: returns
    ({role: {name: (shape, dtype)}} for `roles`, {path: {name: (shape, dtype)}}). Every file is checked complete
    first."""
    for files, _ in groups:
        for source in files:
            check_complete(source)
    shapes = {role: {} for role in roles}
    file_shapes = {}
    for files, index in groups:
        seen = {}
        for source in files:
            file_shapes[source.path] = scan_file(source)
            for name, info in file_shapes[source.path].items():
                if index is not None and os.path.join(os.path.dirname(source.path), index.get(name, "")) != source.path:
                    raise ConversionError(f"{source.path} holds {name!r}, which its index file "
                                          f"{'does not list' if name not in index else 'assigns to ' + index[name]}.")
                if name in seen:
                    raise ConversionError(f"{name!r} appears in two weight files: {seen[name]} and {source.path}.")
                seen[name] = source.path
                shapes[source.role][name] = info
        if index is not None:
            missing = sorted(set(index) - set(seen))
            if missing:
                raise ConversionError(f"The index file lists tensors that no shard holds: {missing[:10]}"
                                      f"{' ...' if len(missing) > 10 else ''}.")
    return shapes, file_shapes

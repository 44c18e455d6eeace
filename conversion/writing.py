"""Writing the converted weights: safetensors shards streamed tensor by tensor (memory bounded by one tensor)."""

import json
import math
import os
import struct

import torch

from .common import ConversionError, write_json

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}


def plan_shards(entries, dtype, max_bytes):
    """Split `[(name, shape)]` (in the order the tensors will be produced) into shards of at most `max_bytes`
    (a larger tensor gets a shard of its own): `[[(name, shape, begin, end)], ...]` with byte offsets."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, used = [], [], 0
    for name, shape in entries:
        size = itemsize * math.prod(shape)
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append((name, tuple(shape), used, used + size))
        used += size
    if current:
        shards.append(current)
    return shards


def safetensors_header(shard, dtype):
    """The 8-byte length + JSON header of a safetensors file holding `shard` (padded to 8 bytes, as safetensors
    writes it)."""
    header = {"__metadata__": {"format": "pt"}}
    for name, shape, begin, end in shard:
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_tensor(handle, name, tensor):
    """Append the raw bytes of tensor `name` (a separate function so tests can intercept what is written)."""
    handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


class StreamingShardWriter:
    """Writes safetensors shards tensor by tensor. The scan knows every output name and shape in the order the
    conversion produces them, so each shard's header is written first and every tensor's bytes are appended as soon
    as it is converted: at most one converted tensor is in memory, whatever the shard size."""

    def __init__(self, folder, entries, dtype, max_bytes):
        self.folder = folder
        self.dtype = dtype
        self.shards = plan_shards(entries, dtype, max_bytes)
        self.shard_index, self.entry_index = 0, 0
        self.handle = None
        self.parts = []
        self.total_bytes = sum(shard[-1][3] for shard in self.shards)
        self.count = 0

    def add(self, name, tensor):
        if self.shard_index >= len(self.shards):
            raise ConversionError(f"Conversion produced {name!r} after every planned tensor was written.")
        expected, shape, _, _ = self.shards[self.shard_index][self.entry_index]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise ConversionError(f"Conversion produced {name!r} {tuple(tensor.shape)} {tensor.dtype}; the plan "
                                  f"expected {expected!r} {shape} {self.dtype} at this point.")
        if self.handle is None:
            part = f"part-{self.shard_index + 1:05d}.safetensors.tmp"
            self.handle = open(os.path.join(self.folder, part), "wb")
            self.handle.write(safetensors_header(self.shards[self.shard_index], self.dtype))
            self.parts.append((part, [entry[0] for entry in self.shards[self.shard_index]]))
        write_tensor(self.handle, name, tensor)
        self.count += 1
        self.entry_index += 1
        if self.entry_index == len(self.shards[self.shard_index]):
            self.handle.close()
            self.handle = None
            self.shard_index, self.entry_index = self.shard_index + 1, 0

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None

    def finish(self):
        """Rename the parts to model.safetensors (one shard) or model-0000i-of-0000n.safetensors + index."""
        if self.shard_index != len(self.shards) or not self.parts:
            raise ConversionError(f"Conversion wrote {self.count} tensors; the plan has "
                                  f"{sum(len(shard) for shard in self.shards)}.")
        if len(self.parts) == 1:
            os.replace(os.path.join(self.folder, self.parts[0][0]), os.path.join(self.folder, "model.safetensors"))
            return 1
        weight_map = {}
        total = len(self.parts)
        for i, (part, names) in enumerate(self.parts, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            os.replace(os.path.join(self.folder, part), os.path.join(self.folder, final))
            weight_map.update({name: final for name in names})
        write_json(os.path.join(self.folder, "model.safetensors.index.json"),
                   {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return total

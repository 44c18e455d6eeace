"""Digests of the tiny original-format VLoRA checkpoints (`original_vlora_format.py`): recorded in the fixtures'
provenance and compared by tests/test_vlora_fixtures.py, so a rebuilt checkpoint is known to be bit-identical."""

import hashlib
import os
import zipfile

import torch



def file_digests(root):
    """``{relative posix path: sha256 hex}`` of every file under ``root`` (sorted)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            with open(full, "rb") as fh:
                out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return dict(sorted(out.items()))


def tensor_digest(state_dict):
    """sha256 over (name, dtype, shape, raw bytes) of every tensor, in name order: independent of the container."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        t = state_dict[k].contiguous()
        h.update(f"{k}|{str(t.dtype)}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weight_file_content_digest(path):
    """``tensor_digest`` of a ``.bin`` (torch.save) or ``.safetensors`` file's tensors (pickles loaded weights-only)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return tensor_digest(load_file(path))
    if zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
        return tensor_digest(torch.load(path, map_location="cpu", weights_only=True))
    raise ValueError(f"not a weight file: {path}")


def content_digests(root):
    """``{relative path: tensor_digest}`` of the weight files under ``root`` (``training_args.bin`` is not one)."""
    out = {}
    for rel in file_digests(root):
        if rel.endswith(".safetensors") or (rel.endswith(".bin") and not rel.endswith("training_args.bin")):
            out[rel] = weight_file_content_digest(os.path.join(root, *rel.split("/")))
    return out

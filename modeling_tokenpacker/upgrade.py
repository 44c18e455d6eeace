"""Give an existing TokenPacker checkpoint folder this release's remote code.

    tokenpacker-upgrade PATH [--push-to-hub REPO_ID]
    python -m modeling_tokenpacker.upgrade PATH

A checkpoint carries the model's Python files, so a folder converted or pushed with an older release keeps the
older code; when a transformers release breaks that code (5.24: `__init__() got an unexpected keyword argument
'cache'`; 5.25 runs it again but warns that `past_key_values` is deprecated), or to take up fixes, this replaces the
shipped modules and the `auto_map` entries with this release's.
Every other file (the weights above all) is left as it is: the new folder is staged beside the old one with hard
links to the same files, checked, then swapped in atomically, and the checksums of the untouched files are compared
before and after. The check loads the staged folder in a fresh process with `trust_remote_code=True` while this
package is not importable, and requires the tokens it generates to equal those of this package's own classes on the
same weights. A killed run leaves the old folder as it was; the next run removes what it left behind.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .configuration_tokenpacker import AUTO_MAP, TokenPackerConfig
from .remote_code import shipped_files
from .staging import StagingFolder, run_child, terminate_cleanly

PROCESSOR_AUTO_MAP = {
    "AutoImageProcessor": "image_processing_tokenpacker.TokenPackerImageProcessor",
    "AutoProcessor": "processing_tokenpacker.TokenPackerProcessor",
}
VERIFY_NEW_TOKENS = 8


class UpgradeError(ValueError):
    """A folder that cannot be upgraded, or an upgrade that did not check out; the folder is left as it was."""


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise UpgradeError(f"{path} does not exist: expected a checkpoint folder with a config.json.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UpgradeError(f"{path} is not readable JSON ({error}).") from None


def _json_bytes(data):
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _local_module(reference):
    """`module` of an auto_map entry `module.Class` or `repo--module.Class` (code from another repository)."""
    return reference.split("--")[-1].rsplit(".", 1)[0]


def plan_upgrade(folder):
    """`{file name: new content}` for every file of `folder` that this release writes differently: the shipped
    modules and the JSON files whose `auto_map` names them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpgradeError(f"{folder} is not a folder: expected a TokenPacker checkpoint folder.")
    config = _read_json(folder / "config.json")
    if config.get("model_type") != TokenPackerConfig.model_type:
        raise UpgradeError(f"{folder / 'config.json'} has model_type {config.get('model_type')!r}; this tool "
                           f"upgrades {TokenPackerConfig.model_type!r} checkpoints.")
    ours = {Path(name).stem for name in shipped_files()}
    changes = {}
    for name, path in shipped_files().items():
        content = path.read_bytes()
        current = folder / name
        if not current.is_file() or current.read_bytes() != content:
            changes[name] = content
    for path in sorted(folder.glob("*.json")):
        data = config if path.name == "config.json" else _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("auto_map"), dict):
            continue
        auto_map = dict(data["auto_map"])
        if path.name == "config.json":
            auto_map.update(AUTO_MAP)
        for key, value in list(auto_map.items()):
            if isinstance(value, str) and _local_module(value) in ours:
                auto_map[key] = {**AUTO_MAP, **PROCESSOR_AUTO_MAP}.get(key, value.split("--")[-1])
        if auto_map != data["auto_map"]:
            changes[path.name] = _json_bytes({**data, "auto_map": auto_map})
    return changes


def sha256_file(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder, skip=()):
    """`{relative path: sha256}` of every file below `folder` except the names in `skip` (top level)."""
    folder = Path(folder)
    result = {}
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder).as_posix()
        if path.is_file() and relative not in skip:
            result[relative] = sha256_file(path)
    return result


def stage(folder, staging, changes):
    """Fill `staging` with hard links to every file of `folder` (copies where the filesystem has no hard links)
    except the changed ones, which are written new."""
    folder, staging = Path(folder), Path(staging)
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        destination = staging / relative
        if path.is_dir() and not path.is_symlink():
            destination.mkdir(exist_ok=True)
        elif relative.as_posix() not in changes:
            try:
                os.link(path, destination, follow_symlinks=False)
            except OSError:
                shutil.copy2(path, destination, follow_symlinks=False)
    for name, content in changes.items():
        with open(staging / name, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())


def verification_inputs(config):
    """Fixed inputs for any TokenPacker checkpoint: `[bos] + image tokens + 8 text ids` and seeded pixel values
    `[1, 3, S, S]`, so the check needs no processor."""
    text = config.text_config
    vocab = text.vocab_size
    specials = {config.image_token_id, getattr(text, "pad_token_id", None), getattr(text, "eos_token_id", None)}
    words = [i for i in range(3, vocab) if i not in specials][:8]
    bos = [text.bos_token_id] if getattr(text, "bos_token_id", None) is not None else []
    input_ids = torch.tensor([bos + [config.image_token_id] * config.image_seq_length + words])
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixel_values}


def generate_tokens(model, inputs):
    with torch.no_grad():
        output = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, do_sample=False,
                                max_new_tokens=VERIFY_NEW_TOKENS, min_new_tokens=VERIFY_NEW_TOKENS)
    return output[:, inputs["input_ids"].shape[1]:].tolist()


# Runs in a fresh `python -I`: loads the folder as remote code only, through every Auto class its files name.
VERIFY_CHILD = r"""
import importlib.abc, json, sys

class BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "modeling_tokenpacker":
            raise ImportError("modeling_tokenpacker must not be importable here")

sys.meta_path.insert(0, BlockPackage())
import torch, transformers
from safetensors.torch import load_file

folder, inputs_path, auto_classes, device = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
loaded = {}
for name in auto_classes:
    if name != "AutoModelForImageTextToText":
        loaded[name] = type(getattr(transformers, name).from_pretrained(folder, trust_remote_code=True)).__name__
model = transformers.AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True,
                                                                 **{dtype_kwarg: "auto"}).to(device).eval()
loaded["AutoModelForImageTextToText"] = type(model).__name__
inputs = {k: v.to(device) for k, v in load_file(inputs_path).items()}
with torch.no_grad():
    output = model.generate(**inputs, do_sample=False, max_new_tokens=int(sys.argv[5]), min_new_tokens=int(sys.argv[5]))
print(json.dumps({"loaded": loaded, "module": type(model).__module__,
                  "tokens": output[:, inputs["input_ids"].shape[1]:].tolist()}))
"""


def named_auto_classes(folder):
    """The Auto classes that the folder's `auto_map` entries name."""
    names = set()
    for path in Path(folder).glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("auto_map"), dict):
            names.update(key for key in data["auto_map"] if key.startswith("Auto") and key != "AutoModelForVision2Seq")
    return sorted(names | {"AutoModelForImageTextToText"})


def verify(folder, scratch):
    """Tokens of the folder loaded as remote code in a fresh process == tokens of this package's classes on the same
    weights; raises UpgradeError otherwise. Returns `{"tokens", "loaded"}`."""
    from safetensors.torch import save_file

    from .demo import DTYPE_KWARG
    from .modeling_tokenpacker import TokenPackerForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = TokenPackerForConditionalGeneration.from_pretrained(folder, **{DTYPE_KWARG: "auto"}).to(device).eval()
    inputs = verification_inputs(model.config)
    expected = generate_tokens(model, inputs)
    del model
    inputs_path = Path(scratch) / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(inputs_path))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(scratch) / "modules"))
    command = [sys.executable, "-I", "-c", VERIFY_CHILD, str(folder), str(inputs_path),
               json.dumps(named_auto_classes(folder)), device, str(VERIFY_NEW_TOKENS)]
    result = run_child(command, capture_output=True, text=True, env=env, cwd=scratch)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise UpgradeError(f"the upgraded folder does not load as remote code: {lines[-1] if lines else result.returncode}")
    child = json.loads(result.stdout.strip().splitlines()[-1])
    if not child["module"].startswith("transformers_modules"):
        raise UpgradeError(f"the check loaded the model from {child['module']}, not from the folder's own files.")
    if child["tokens"] != expected:
        raise UpgradeError(f"the upgraded folder generates {child['tokens']} as remote code but this package's "
                           f"classes generate {expected} on the same weights.")
    return {"tokens": expected, "loaded": child["loaded"]}


def push(folder, repo_id, files, private=False):
    """Upload the changed files of `folder` to the Hub repository `repo_id` (the weights are already there)."""
    from huggingface_hub import HfApi

    from . import __version__

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=sorted(files),
                             commit_message=f"Upgrade the remote code to modeling_tokenpacker {__version__}")


def upgrade(path, verify_result=True, push_to_hub=None, private=False, log=print):
    """Upgrade the checkpoint folder `path` in place (see the module docstring); returns a summary dict."""
    path = Path(path).absolute()
    if push_to_hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(push_to_hub)
        except HFValidationError as error:
            raise UpgradeError(f"--push-to-hub {push_to_hub!r} is not a Hub repository id: {error}") from None
    log(f"checking {path}")
    changes = plan_upgrade(path)
    summary = {"changed": sorted(changes), "untouched": 0, "untouched_bytes": 0, "tokens": None}
    if not changes:
        log("already up to date: the shipped modules and auto_map are this release's")
        return summary
    before = checksums(path, skip=changes)
    summary["untouched"] = len(before)
    summary["untouched_bytes"] = sum((path / name).stat().st_size for name in before)
    with terminate_cleanly(), StagingFolder(path, "upgrade") as staging:
        for sentence in staging.repairs:
            log(sentence)
        log(f"staging {len(changes)} new files ({', '.join(sorted(changes))}) beside {len(before)} untouched ones")
        stage(path, staging.path, changes)
        if verify_result:
            log("verifying in a fresh process (remote code only) against this package's classes")
            with tempfile.TemporaryDirectory(prefix="tokenpacker_upgrade_check_") as scratch:
                checked = verify(staging.path, scratch)
            summary["tokens"] = checked["tokens"]
            log(f"verified: {', '.join(sorted(checked['loaded']))} load; greedy tokens equal ({checked['tokens'][0]})")
        log("swapping the upgraded folder in")
        staging.commit()
    after = checksums(path, skip=changes)
    if after != before:
        differing = sorted(name for name in before if after.get(name) != before[name])
        raise UpgradeError(f"files that should be untouched changed during the upgrade: {differing}")
    log(f"done: {len(changes)} files replaced; {len(before)} other files ({summary['untouched_bytes']} bytes) have "
        "the same sha256 as before")
    if push_to_hub is not None:
        log(f"pushing {len(changes)} files to {push_to_hub}")
        push(path, push_to_hub, changes, private=private)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tokenpacker-upgrade", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("path", help="checkpoint folder (download a Hub repo first: hf download REPO --local-dir PATH)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the changed files to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private if it is new")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip loading the result in a fresh process (the swap is then unchecked)")
    args = parser.parse_args(argv)
    try:
        upgrade(args.path, verify_result=args.verify, push_to_hub=args.push_to_hub, private=args.private,
                log=lambda line: print(line, flush=True))
    except (UpgradeError, OSError) as error:
        print(f"tokenpacker-upgrade: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokenpacker-upgrade: interrupted; the folder is as it was", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Verification: the converted folder loaded through the Auto classes in a fresh process (its own remote code,
the package blocked), every tensor compared bit for bit with the mapped source tensor."""

import json
import logging
import os
import sys
import textwrap
from pathlib import Path

import torch

from .common import DTYPES, ConversionError, one_line
from .llava import IMAGE_TOKEN, Plan, iter_converted

REPO_ROOT = Path(__file__).resolve().parent.parent

logger = logging.getLogger("tokenpacker.conversion")

VERIFY_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class _BlockPackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_tokenpacker":
                raise ImportError("verification loads the checkpoint's own remote code, not modeling_tokenpacker")
            return None

    sys.meta_path.insert(0, _BlockPackage())
    repo_root, output, plan_path = sys.argv[1:4]
    sys.path.insert(0, repo_root)
    from conversion.verification import verify_in_this_process

    print(json.dumps(verify_in_this_process(output, plan_path)))
    """
)


def verify_in_this_process(output, plan_path):
    """Load `output` through the Auto classes (remote code) and compare every state-dict tensor with the mapped
    source tensor, bit for bit. Returns a JSON-able report; used by the verification child."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    plan = Plan.load(plan_path)
    dtype = DTYPES[plan.dtype]
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    dtype_kwarg = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, **{dtype_kwarg: dtype})
    state = model.state_dict()
    report = {"module": type(model).__module__, "class": type(model).__name__, "num_state_tensors": len(state),
              "checked": 0, "mismatched": [], "unexpected": [], "missing": [], "wrong_dtype": [],
              "imported_package": False, "processor": None}
    seen = set()
    for _, _, outputs in iter_converted(plan):
        for name, tensor in outputs:
            if name not in state:
                report["unexpected"].append(name)
                continue
            have = state[name]
            seen.add(name)
            report["checked"] += 1
            if have.dtype != dtype:
                report["wrong_dtype"].append(f"{name}: {have.dtype}")
            elif have.shape != tensor.shape or not torch.equal(have, tensor):
                report["mismatched"].append(name)
    report["missing"] = sorted(set(state) - seen)
    tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=True)
    report["tokenizer_image_token_id"] = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    report["config_image_token_id"] = model.config.image_token_id
    report["processor"] = type(AutoProcessor.from_pretrained(output, trust_remote_code=True)).__name__
    report["imported_package"] = any(name.split(".")[0] == "modeling_tokenpacker" for name in sys.modules)
    return report


def verify_output(folder, plan, scratch_beside):
    """Run `verify_in_this_process` in a fresh interpreter (`python -I`, the package blocked); returns the number of
    tensors checked, or raises ConversionError with what differs. The child works in a scratch folder beside
    `scratch_beside` (owned by this process: removed on exit, or by the next run if this one is killed) and is
    ended with this process."""
    from modeling_tokenpacker.staging import StagingFolder, run_child

    with StagingFolder(scratch_beside, "verify") as scratch:
        plan_path = os.path.join(scratch.path, "plan.json")
        plan.save(plan_path)
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        # the remote-code copy transformers makes of the (temporary) folder goes away with the scratch folder
        env["HF_MODULES_CACHE"] = os.path.join(scratch.path, "modules")
        logger.info("progress: verifying %s in a fresh process", folder)
        completed = run_child([sys.executable, "-I", "-c", VERIFY_CHILD, str(REPO_ROOT), str(folder), plan_path],
                              capture_output=True, text=True, cwd=scratch.path, env=env)
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        raise ConversionError(f"Verification failed: loading the converted folder in a fresh process crashed: "
                              f"{one_line(lines[-1] if lines else completed.returncode, 300)}")
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    problems = []
    if report["mismatched"]:
        problems.append(f"{len(report['mismatched'])} tensors differ from the source: {report['mismatched'][:10]}")
    for key in ("unexpected", "missing", "wrong_dtype"):
        if report[key]:
            problems.append(f"{key}: {report[key][:10]}")
    if not report["module"].startswith("transformers_modules"):
        problems.append(f"the model class came from {report['module']}, not the checkpoint's remote code")
    if report["imported_package"]:
        problems.append("the child imported modeling_tokenpacker")
    if report["tokenizer_image_token_id"] != report["config_image_token_id"]:
        problems.append(f"tokenizer <image> id {report['tokenizer_image_token_id']} != config image_token_id "
                        f"{report['config_image_token_id']}")
    if report["checked"] != report["num_state_tensors"]:
        problems.append(f"checked {report['checked']} of {report['num_state_tensors']} state-dict tensors")
    if problems:
        raise ConversionError("Verification failed: " + "; ".join(problems) + ".")
    logger.info("Verified: %d tensors bit-exact (%s, processor: %s).", report["checked"], report["class"],
                report["processor"])
    return report["checked"]

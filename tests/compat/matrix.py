"""The shipped remote code on every minor release of transformers that setup.cfg allows, measured.

    python tests/compat/matrix.py                      # last patch of every minor release, 4.46 ... newest
    python tests/compat/matrix.py --versions 4.46.3 5.24.0 --jobs 2
    python tests/compat/matrix.py --family vlora --output tests/compat/matrix_vlora.csv   # the VLoRA family

Opt-in (not part of the test command: about half a minute per release on 2 cores once pip's cache is warm). This
interpreter's transformers is the reference ("newest"). It saves the demo's tiny checkpoint; then for each release a
virtual environment (tests/compat/venvs.py: that transformers, this torch) loads it through every Auto class with
`trust_remote_code=True` while the package is not importable, generates greedily and is compared with the
reference (tokens, largest logit difference over every step); then the reverse: the release saves the checkpoint,
and this interpreter loads it and must generate what the release generated from it. Releases from 4.54 on also
load the checkpoint in 4-bit (bitsandbytes on CPU) and are compared with the reference's 4-bit tokens.
Writes a CSV (default tests/compat/matrix.csv) and prints the same table as Markdown for README's "Tested with".
"""

import argparse
import concurrent.futures
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import transformers
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))

from compat.venvs import CACHE_ROOT, ensure_venv  # noqa: E402

FLOOR = Version("4.46")  # setup.cfg's transformers>=4.46
FIRST_WITH_CPU_BITSANDBYTES = Version("4.54")
LOGIT_TOLERANCE = 1e-4
COLUMNS = ["transformers", "loads", "generates", "tokens_equal", "max_logit_diff", "reverse", "bnb_4bit", "seconds",
           "notes"]
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
EXPECTED_CLASSES = {
    "AutoConfig": "TokenPackerConfig",
    "AutoImageProcessor": "TokenPackerImageProcessor",
    "AutoProcessor": "TokenPackerProcessor",
    "AutoModel": "TokenPackerModel",
    "AutoModelForCausalLM": "TokenPackerForConditionalGeneration",
    "AutoModelForImageTextToText": "TokenPackerForConditionalGeneration",
}


def last_patch_of_every_minor(newest):
    """Versions pip can install, from FLOOR to `newest`, the last patch of each minor release."""
    listing = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                             capture_output=True, text=True, timeout=300)
    line = next((item for item in listing.stdout.splitlines() if item.startswith("Available versions:")), None)
    if line is None:
        raise SystemExit(f"pip index versions transformers gave no list:\n{listing.stdout}{listing.stderr}")
    best = {}
    for text in line.split(":", 1)[1].split(","):
        version = Version(text.strip())
        if version.is_prerelease or not FLOOR <= version <= newest:
            continue
        key = (version.major, version.minor)
        best[key] = max(best.get(key, version), version)
    return [str(best[key]) for key in sorted(best)]


class ChildError(RuntimeError):
    pass


def child(python, *args, timeout=900):
    """One JSON result of child.py run by `python` (isolated mode: no PYTHONPATH, no script folder on sys.path)."""
    with tempfile.TemporaryDirectory() as cwd:
        result = subprocess.run([str(python), "-I", str(HERE / "child.py"), *map(str, args)], capture_output=True,
                                text=True, timeout=timeout, cwd=cwd, env=CHILD_ENV)
    if result.returncode != 0:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        raise ChildError(lines[-1] if lines else f"exit {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def max_logit_diff(a, b):
    """Largest absolute difference between two runs' per-step logits ([steps][batch][vocab])."""
    import torch

    return float((torch.tensor(a["logits"]) - torch.tensor(b["logits"])).abs().max())


VLORA_EXPECTED_CLASSES = {
    "AutoConfig": "VLoRAConfig",
    "AutoImageProcessor": "VLoRAImageProcessor",
    "AutoProcessor": "VLoRAProcessor",
    "AutoModel": "VLoRAModel",
    "AutoModelForCausalLM": "VLoRAForConditionalGeneration",
    "AutoModelForImageTextToText": "VLoRAForConditionalGeneration",
}
FAMILY = {"name": "tokenpacker", "expected": EXPECTED_CLASSES}  # set by --family


def loads_everything(result):
    return result["loaded"] == FAMILY["expected"] and not result["imported_package"]


def measure(version, work, reference, reference_4bit, images, venv_root):
    """One row of the table for `version`."""
    start = time.time()
    row = {"transformers": version, "loads": "no", "generates": "no", "tokens_equal": "no", "max_logit_diff": "",
           "reverse": "no", "bnb_4bit": "n/a", "notes": ""}
    notes = []
    with_bnb = Version(version) >= FIRST_WITH_CPU_BITSANDBYTES
    extra = ["pillow", "accelerate"] + (["bitsandbytes>=0.48"] if with_bnb else [])
    try:
        python = ensure_venv(venv_root / f"venv-transformers-{version}", version, extra)
    except RuntimeError as error:
        row["notes"] = f"environment: {str(error).splitlines()[-1]}"
        return row
    try:
        result = child(python, "run", work / "checkpoint_newest", images)
        row["loads"] = "yes" if loads_everything(result) else f"no: {result['loaded']}"
        if result["notes"] and row["loads"] == "yes":
            row["loads"] = "yes*"
            notes.extend(result["notes"])
        row["generates"] = "yes"
        row["tokens_equal"] = "yes" if result["tokens"] == reference["tokens"] else "no"
        row["max_logit_diff"] = f"{max_logit_diff(result, reference):.1e}"
    except ChildError as error:
        notes.append(f"load/generate: {error}")
    try:
        saved = work / f"checkpoint_{version.replace('.', '_')}"
        child(python, "build", saved, REPO, "--family", FAMILY["name"])
        theirs = child(python, "run", saved, images)
        ours = child(sys.executable, "run", saved, images)
        same = ours["tokens"] == theirs["tokens"] and loads_everything(ours)
        row["reverse"] = "yes" if same else "no"
        if not same:
            notes.append(f"reverse: logit diff {max_logit_diff(ours, theirs):.1e}")
    except ChildError as error:
        notes.append(f"reverse: {error}")
    if with_bnb and reference_4bit is not None:
        try:
            quantized = child(python, "run", work / "checkpoint_newest", images, "--quantization", "4bit")
            row["bnb_4bit"] = "yes" if quantized["tokens"] == reference_4bit["tokens"] else "tokens differ"
        except ChildError as error:
            row["bnb_4bit"] = "no"
            notes.append(f"4-bit: {error}")
    row["seconds"] = f"{time.time() - start:.0f}"
    row["notes"] = "; ".join(notes)
    return row


def is_green(row):
    diff = row["max_logit_diff"]
    return (row["loads"] in ("yes", "yes*") and row["generates"] == row["tokens_equal"] == row["reverse"] == "yes"
            and diff != "" and float(diff) <= LOGIT_TOLERANCE and row["bnb_4bit"] in ("yes", "n/a"))


def markdown(rows):
    header = ["transformers", "loads (6 Auto classes)", "generates", "tokens = newest", "max logit diff",
              "reverse (newest loads its save)", "4-bit (bitsandbytes, CPU)"]
    keys = ["transformers", "loads", "generates", "tokens_equal", "max_logit_diff", "reverse", "bnb_4bit"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row[key] or "-" for key in keys) + " |" for row in rows]
    starred = [row["transformers"] for row in rows if row["loads"] == "yes*"]
    if starred:
        note = next(row["notes"] for row in rows if row["loads"] == "yes*")
        lines += ["", f"\\* {', '.join(starred)}: all six load, but these releases' public `transformers.AutoImageProcessor` "
                  f"name needs torchvision for every model ({note}); the class itself, which `AutoProcessor` uses, loads "
                  "ours without it."]
    return "\n".join(lines)


def main(argv=None):
    newest = Version(transformers.__version__)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", help="releases to test (default: last patch of every minor "
                        f"release from {FLOOR} to this interpreter's {newest})")
    parser.add_argument("--jobs", type=int, default=2, help="releases measured at once (default: 2)")
    parser.add_argument("--family", choices=["tokenpacker", "vlora"], default="tokenpacker",
                        help="model family of the demo checkpoint (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=HERE / "matrix.csv", help="CSV to write (default: %(default)s)")
    parser.add_argument("--venv-root", type=Path, default=CACHE_ROOT / "matrix",
                        help="where the environments are kept for the next run (default: %(default)s)")
    args = parser.parse_args(argv)
    FAMILY.update(name=args.family, expected=VLORA_EXPECTED_CLASSES if args.family == "vlora" else EXPECTED_CLASSES)
    versions = args.versions or last_patch_of_every_minor(newest)
    print(f"reference: transformers {newest} ({sys.executable}); releases: {' '.join(versions)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="tokenpacker_matrix_") as folder:
        work = Path(folder)
        from modeling_tokenpacker.demo import build_demo_checkpoint, synthesize_image
        from modeling_tokenpacker.demo_vlora import build_vlora_demo_checkpoint

        (build_vlora_demo_checkpoint if args.family == "vlora" else build_demo_checkpoint)(work / "checkpoint_newest")
        paths = []
        for i, size in enumerate([(480, 360), (300, 500)]):
            paths.append(work / f"image{i}.png")
            synthesize_image(*size).save(paths[-1])
        images = ",".join(map(str, paths))
        reference = child(sys.executable, "run", work / "checkpoint_newest", images)
        try:
            reference_4bit = child(sys.executable, "run", work / "checkpoint_newest", images, "--quantization", "4bit")
        except ChildError as error:
            print(f"no 4-bit reference (is bitsandbytes installed?): {error}")
            reference_4bit = None
        rows = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(measure, version, work, reference, reference_4bit, images, args.venv_root): version
                       for version in versions}
            for future in concurrent.futures.as_completed(futures):
                row = future.result()
                rows[row["transformers"]] = row
                print(f"{row['transformers']:>8}: {'green' if is_green(row) else 'RED'} {json.dumps(row)}", flush=True)
    ordered = [rows[version] for version in sorted(rows, key=Version)]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.output.with_suffix(".tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(ordered)
    temporary.replace(args.output)
    print(markdown(ordered))
    red = [row["transformers"] for row in ordered if not is_green(row)]
    print(f"{len(ordered) - len(red)} of {len(ordered)} releases green" + (f"; red: {' '.join(red)}" if red else ""))
    return 1 if red else 0


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the benchmark scripts: machine description, interleaved timing, CSV/JSON output, plots.

Not part of the shipped model code. Scripts in this folder import it as a sibling module (`python
benchmarks/<script>.py` puts this folder on `sys.path`).
"""

import csv
import json
import os
import platform
import statistics
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATPLOTLIB_MISSING = "matplotlib not installed, skipping plot (pip install matplotlib, or the package's `bench` extra)"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dims of the vLLM and training-step benchmarks. "cpu": CLIP-L/336's grid and depth with narrow layers and a 4-layer
# LLaMA (head_dim 64: vLLM's CPU attention needs at least 32); "7b": CLIP ViT-L/14-336 + Vicuna-7B (for a GPU).
SMALL_LM_SIZES = {
    "cpu": {"vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 24, "num_attention_heads": 2},
            "text": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 8,
                     "num_key_value_heads": 8},
            "projector_hidden_size": 256, "projector_num_heads": 2},
    "7b": {"vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
           "text": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 32},
           "projector_hidden_size": 1024, "projector_num_heads": 8},
}


def cpu_model():
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device="cpu"):
    """What the numbers were measured on: CPU model, cores, threads, library versions (and the GPU, if used)."""
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the SIMD level torch's kernels use
        "logical_cores": os.cpu_count(),
        "cores_available_to_process": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def describe_machine(info):
    text = (f"{info['cpu_model']} ({info.get('cpu_capability', '?')}), {info['logical_cores']} logical cores, "
            f"{info['torch_threads']} torch threads, "
            f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']}")
    if "gpu" in info:
        text += f", GPU {info['gpu']} (CUDA {info['cuda']})"
    return text


def check_device(device):
    """Exit with a clear message when the requested accelerator is not there."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch {torch.__version__} sees no CUDA device on this machine")
    return device


def synchronizer(device):
    """A callable that waits for queued device work (no-op on CPU)."""
    if str(device).startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


CLOCKS = {
    # Elapsed time: what a user waits for; includes the time this process was descheduled by other jobs.
    "wall": time.perf_counter,
    # CPU time of this process: with `--threads 1` the work itself, unaffected by other jobs taking the core away
    # (memory stalls still count). With several threads it adds up all threads, spin-waits included: use wall.
    "cpu": time.process_time,
}


def get_clock(name, device, threads):
    """The timer for `--clock`; CPU time only makes sense for single-threaded CPU runs."""
    if name == "cpu" and (str(device) != "cpu" or threads != 1):
        raise SystemExit("--clock cpu measures single-threaded CPU runs: add --threads 1 (and use the CPU device)")
    return CLOCKS[name]


def time_interleaved(functions, repeats, warmup=1, sync=lambda: None, clock=time.perf_counter):
    """Run every function of `functions` (name -> callable) once per round, for `warmup` + `repeats` rounds; the order
    rotates every round, so slow phases of a shared machine hit all of them alike. Returns name -> list of seconds
    (warm-up rounds dropped)."""
    names = list(functions)
    samples = {name: [] for name in names}
    for round_index in range(warmup + repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = clock()
            functions[name]()
            sync()
            if round_index >= warmup:
                samples[name].append(clock() - start)
    return samples


def median(values):
    return statistics.median(values)


def spread(values):
    """(25th, 75th) percentile of the samples, a robust width for a noisy machine."""
    if len(values) < 2:
        return values[0], values[0]
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return quartiles[0], quartiles[2]


def add_timing_arguments(parser):
    """The options every timing script shares: rounds, threads, clock, device, dtype, seed, outputs, replot."""
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int,
                        help="torch.set_num_threads for the whole run (default: torch's; quick: 1)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: process CPU time (with --threads 1; robust on a shared machine)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV and JSON already there")


def output_paths(output_dir, name, quick):
    """CSV, PNG and sidecar-JSON paths; `--quick` runs get a `_quick` suffix so they never overwrite real results."""
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, name + ("_quick" if quick else ""))
    return stem + ".csv", stem + ".png", stem + ".json"


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv_rows(path):
    """Rows written by `write_csv`, with numbers turned back into int/float (to re-plot without re-measuring)."""

    def convert(value):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return value

    with open(path, newline="") as handle:
        return [{key: convert(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def portable_arguments(args):
    """The command-line arguments without machine paths: paths inside the repository relative to it, others
    reduced to their last component."""

    def portable(value):
        if not (isinstance(value, str) and os.path.isabs(value)):
            return value
        relative = os.path.relpath(value, REPO_ROOT)
        return os.path.basename(value) if relative.startswith("..") else relative

    return {key: portable(value) for key, value in vars(args).items()}


def write_json(path, payload):
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=False)
        handle.write("\n")


def import_pyplot():
    """matplotlib.pyplot with a file-only backend, or None after printing a clear message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_MISSING)
        return None
    return plt


def print_table(rows, columns):
    """Print `rows` (dicts) as a fixed-width table; `columns` is a list of (key, header, format)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], fmt) if isinstance(row[key], (int, float)) else str(row[key])
                      for key, _, fmt in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for index, line in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def add_repo_to_path():
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)

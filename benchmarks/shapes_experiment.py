"""TokenPacker's claim in miniature: accuracy against visual tokens on the shapes task, all projectors trained alike.

    python benchmarks/shapes_experiment.py experiment            # 10 projectors x 3 seeds -> benchmarks/results/
    python benchmarks/shapes_experiment.py experiment --finished-only   # the table of the runs recorded so far
    python benchmarks/shapes_experiment.py experiment --toy      # a smoke run in seconds (tests/test_shapes.py)
    python benchmarks/shapes_experiment.py one tokenpacker-144 0 --workdir W   # one variant and seed
    python benchmarks/shapes_experiment.py demo-model            # retrain the demo's embedded checkpoint

Each run builds a random-weights model of one variant (`modeling_tokenpacker.shapes_model.VARIANTS`: the same vision
tower, language model and tokenizer, only the projector differs), trains everything from scratch with
`python -m modeling_tokenpacker.train --stage finetune --train_vision_tower true` on the same scenes, steps and
seed, and answers the test split's questions greedily. Runs go two at a time, one thread each. Each finished run's
record (accuracy per kind, wall time, recipe) is kept in `--records` (benchmarks/results/shapes_runs), and a run
whose record has the same recipe is not made again: the experiment, hours on 2 cores, can be made a part at a time.
TTFT (batch 1, median of 5, the thread count of a run) is measured afterwards on a random-weights model of each
variant (the same shapes, so the same time), alone on the machine. Writes shapes_experiment.json / .csv / .png under
benchmarks/results (or --results).
"""

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from modeling_tokenpacker import shapes_model, shapes_task
from modeling_tokenpacker.demo_quiz import DEMO_MODEL_DIR

RESULTS = Path(__file__).resolve().parent / "results"


def recipe(args):
    return {"task_version": shapes_task.TASK_VERSION, "train_scenes": args.train_scenes,
            "test_scenes": args.test_scenes, "steps": args.steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "vision_layers": args.vision_layers}


def write_split(workdir, split, scenes):
    """LLaVA JSON of `scenes` scenes of `split` (images rendered once, reused by every run)."""
    path = workdir / f"{split}_{scenes}.json"
    if not path.exists():
        rows = shapes_task.llava_rows(split, scenes, workdir / "images")
        path.with_suffix(".tmp").write_text(json.dumps(rows))
        path.with_suffix(".tmp").replace(path)
    return path


def train_command(init, data, images, output, seed, args):
    return [sys.executable, "-m", "modeling_tokenpacker.train", "--model_name_or_path", str(init),
            "--stage", "finetune", "--train_vision_tower", "true", "--data_path", str(data),
            "--image_folder", str(images), "--output_dir", str(output), "--max_steps", str(args.steps),
            "--per_device_train_batch_size", str(args.batch_size), "--learning_rate", str(args.learning_rate),
            "--lr_scheduler_type", "cosine", "--warmup_steps", str(max(1, args.steps // 20)),
            "--weight_decay", "0", "--logging_steps", str(max(1, args.steps // 10)), "--save_strategy", "no",
            "--report_to", "none", "--use_cpu", "true", "--seed", str(seed), "--data_seed", str(seed),
            "--dataloader_num_workers", "0", "--model_max_length", "1024"]


def train_and_evaluate(variant, seed, workdir, args):
    """Train one variant from scratch, answer the test questions: -> result dict (accuracy per kind, wall time)."""
    data = write_split(workdir, "train", args.train_scenes)
    run = workdir / "runs" / f"{variant}-seed{seed}"
    shutil.rmtree(run, ignore_errors=True)
    shapes_model.build_checkpoint(run / "init", variant, seed, args.vision_layers)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    log = run / "train.log"
    with open(log, "w") as handle:
        done = subprocess.run(train_command(run / "init", data, workdir / "images", run / "model", seed, args),
                              stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"training {variant} seed {seed} failed; see {log}:\n{log.read_text()[-3000:]}")
    scores = evaluate(run / "model", args.test_scenes, args.threads)
    return {"variant": variant, "seed": seed, "train_wall_s": round(wall, 1), "threads": args.threads,
            "recipe": recipe(args), **scores}


def evaluate(folder, test_scenes, threads=1):
    """Accuracy on `test_scenes` scenes of the test split (every question kind) of the checkpoint in `folder`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(threads)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    examples = shapes_task.examples("test", test_scenes)
    return {"accuracy": shapes_model.accuracy(examples, shapes_model.answer_questions(model, processor, examples)),
            "visual_tokens": model.config.image_seq_length}


def measure_ttft(variant, folder, threads=1, vision_layers=shapes_model.VISION_LAYERS):
    """TTFT of a random-weights checkpoint of `variant` written to `folder` (the trained one times the same)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(threads)
    shapes_model.build_checkpoint(folder, variant, vision_layers=vision_layers)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    scene = shapes_task.make_scene(shapes_task.SPLIT_SEEDS["test"])
    question = scene.questions()[0][0]
    return shapes_model.time_to_first_token(model, processor, scene, question)


def summarise(results, ttft):
    """One row per variant: accuracy mean and spread over seeds (overall and per kind), overall and digit accuracy
    per seed (in `results`' order), tokens, TTFT."""
    rows = []
    for variant in shapes_model.VARIANTS:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        row = {"variant": variant, "projector": shapes_model.VARIANTS[variant][0],
               "visual_tokens": runs[0]["visual_tokens"], "seeds": len(runs)}
        for kind in ("all", *shapes_task.QUESTION_KINDS):
            values = [r["accuracy"][kind] for r in runs]
            row[f"{kind}_mean"] = statistics.fmean(values)
            row[f"{kind}_std"] = statistics.pstdev(values)
        row["all_per_seed"] = [r["accuracy"]["all"] for r in runs]
        row["digit_per_seed"] = [r["accuracy"]["digit"] for r in runs]
        row["ttft_ms"] = ttft.get(variant, float("nan")) * 1000
        row["train_wall_s"] = statistics.fmean(r["train_wall_s"] for r in runs)
        rows.append(row)
    return rows


def print_table(rows):
    """A markdown table: accuracy mean ± std (per seed), the mean per kind, the digit per seed, TTFT, train wall."""
    def per_seed(values):
        return " ".join(f"{value:.3f}" for value in values)

    print("| projector | visual tokens | accuracy (mean ± std; per seed) | colour | shape | count | larger "
          "| digit (per seed) | TTFT | train wall |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        kinds = " | ".join(f"{row[f'{k}_mean']:.3f}" for k in shapes_task.QUESTION_KINDS if k != "digit")
        print(f"| {row['projector']} | {row['visual_tokens']} | {row['all_mean']:.3f} ± {row['all_std']:.3f}; "
              f"{per_seed(row['all_per_seed'])} | {kinds} | {row['digit_mean']:.3f}; {per_seed(row['digit_per_seed'])} "
              f"| {row['ttft_ms']:.1f} ms | {row['train_wall_s']:.0f} s |")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for projector, marker in (("tokenpacker", "o"), ("avg_pool", "s"), ("resampler", "^"), ("mlp2x_gelu", "*")):
        mine = sorted((r for r in rows if r["projector"] == projector), key=lambda r: r["visual_tokens"])
        if not mine:
            continue
        tokens = [r["visual_tokens"] for r in mine]
        axes[0].errorbar(tokens, [r["all_mean"] for r in mine], yerr=[r["all_std"] for r in mine], marker=marker,
                         capsize=3, label=projector)
        axes[1].plot([r["ttft_ms"] for r in mine], [r["all_mean"] for r in mine], marker=marker, label=projector)
    axes[0].set(xscale="log", xlabel="visual tokens per image", ylabel="test accuracy",
                title="shapes task: accuracy vs visual tokens")
    axes[0].set_xticks([36, 64, 144, 576], ["36", "64", "144", "576"])
    axes[0].minorticks_off()
    axes[1].set(xlabel="TTFT (ms, batch 1)", ylabel="test accuracy", title="accuracy vs time to first token")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


# The files of a trained run that the package ships as the demo's checkpoint (no remote code: `demo_quiz` adds this
# release's; no pickles such as training_args.bin).
SHIPPED_SUFFIXES = (".json", ".safetensors", ".jinja")
DEMO_MODEL_LIMIT = 10 * 2**20
DEMO_VARIANT = "tokenpacker-36"
# The demo's model differs from the experiment's runs in its tower (one layer: 30 % less compute a step, and it learnt
# sooner) and its steps; README: "The shapes task and the demo's model".
DEMO_VISION_LAYERS, DEMO_STEPS, EXPERIMENT_STEPS = 1, 1000, 1500


def demo_model(args, workdir):
    """Train `args.variants[0]` with seed `args.seeds[0]` (or take the run an experiment made in `workdir` with this
    recipe), evaluate it on the test split and replace the package's embedded checkpoint (`args.output`) with it and
    its record (`training.json`)."""
    variant, seed = args.variants[0], args.seeds[0]
    trained = workdir / "runs" / f"{variant}-seed{seed}" / "model"
    result = recorded(args, variant, seed) if (trained / "model.safetensors").exists() else None
    if result is None:  # not already trained by an experiment in this workdir with this recipe
        result = train_and_evaluate(variant, seed, workdir, args)
    staging = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in sorted(trained.iterdir()):
        if path.is_file() and path.name.endswith(SHIPPED_SUFFIXES):
            shutil.copyfile(path, staging / path.name)
    size = sum(path.stat().st_size for path in staging.iterdir())
    if size > DEMO_MODEL_LIMIT:
        shutil.rmtree(staging)
        raise SystemExit(f"the trained checkpoint is {size / 2**20:.1f} MB; the package ships at most "
                         f"{DEMO_MODEL_LIMIT / 2**20:.0f} MB.")
    record = {"variant": variant, "seed": seed, "recipe": recipe(args), "machine": machine(),
              "train_wall_s": result["train_wall_s"], "train_threads": result["threads"],
              "test_questions": args.test_scenes * len(shapes_task.QUESTION_KINDS),
              "test_accuracy": result["accuracy"], "command": "python benchmarks/shapes_experiment.py demo-model",
              "size_bytes": size}
    (staging / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(args.output, ignore_errors=True)
    staging.replace(args.output)
    print(json.dumps(record, indent=1))
    return record


def experiment(args, workdir):
    """Train and evaluate every (variant, seed) not yet recorded in `args.records` (all of them unless
    `--finished-only`), then summarise every recorded run of this recipe: table, JSON, CSV and plot."""
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variants
            if recorded(args, variant, seed) is None]
    start = time.perf_counter()
    if jobs and not args.finished_only:
        write_split(workdir, "train", args.train_scenes)
        with ThreadPoolExecutor(args.jobs) as pool:
            for future in [pool.submit(run_in_child, variant, seed, workdir, args) for variant, seed in jobs]:
                r = future.result()
                print(f"{r['variant']:>16} seed {r['seed']}: accuracy {r['accuracy']['all']:.3f} "
                      f"(train {r['train_wall_s']:.0f} s)", flush=True)
    results = [r for seed in args.seeds for variant in args.variants
               if (r := recorded(args, variant, seed)) is not None]
    if not results:
        raise SystemExit(f"no finished run of this recipe is recorded in {args.records}.")
    done_variants = [variant for variant in args.variants if any(r["variant"] == variant for r in results)]
    ttft = {variant: measure_ttft(variant, workdir / "ttft" / variant, args.threads, args.vision_layers)
            for variant in done_variants}
    rows = summarise(results, ttft)
    print_table(rows)
    missing = len(args.variants) * len(args.seeds) - len(results)
    if missing:
        print(f"{missing} of the {len(args.variants) * len(args.seeds)} runs asked for are not finished yet")
    args.results.mkdir(parents=True, exist_ok=True)
    record = {"recipe": recipe(args), "seeds": args.seeds, "machine": machine(), "wall_s": time.perf_counter() - start,
              "runs_missing": missing, "runs": results, "summary": rows}
    (args.results / "shapes_experiment.json").write_text(json.dumps(record, indent=1))
    with open(args.results / "shapes_experiment.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if not args.no_plot:
        plot(rows, args.results / "shapes_experiment.png")
    return record


def record_path(args, variant, seed):
    return args.records / f"{variant}-seed{seed}.json"


def recorded(args, variant, seed):
    """The recorded result of `variant` and `seed` if it was made with this recipe, else None."""
    path = record_path(args, variant, seed)
    if path.exists():
        result = json.loads(path.read_text())
        if result.get("recipe") == recipe(args):
            return result
    return None


def save_record(args, result):
    """Write a run's result to `args.records` atomically (a killed run leaves no half-written record)."""
    args.records.mkdir(parents=True, exist_ok=True)
    path = record_path(args, result["variant"], result["seed"])
    path.with_suffix(".tmp").write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)


def run_in_child(variant, seed, workdir, args):
    """`train_and_evaluate` in a child process (its own torch thread setting and memory); -> its record."""
    command = [sys.executable, os.path.abspath(__file__), "one", variant, str(seed), "--workdir", str(workdir),
               "--records", str(args.records), *common_flags(args)]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    return recorded(args, variant, seed)


def common_flags(args):
    return ["--train-scenes", str(args.train_scenes), "--test-scenes", str(args.test_scenes), "--steps",
            str(args.steps), "--batch-size", str(args.batch_size), "--learning-rate", str(args.learning_rate),
            "--threads", str(args.threads), "--vision-layers", str(args.vision_layers)]


def machine():
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["experiment", "one", "demo-model"])
    parser.add_argument("variant", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("seed", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variants", nargs="+", choices=shapes_model.VARIANTS,
                        help=f"default: every variant; demo-model: {DEMO_VARIANT}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    # The defaults are the experiment's recipe and, where demo-model's differ (steps, tower), its own
    # (modeling_tokenpacker/demo_model/training.json).
    parser.add_argument("--train-scenes", type=int, default=4000, help="training scenes (one 5-question conversation each)")
    parser.add_argument("--test-scenes", type=int, default=100, help="test scenes (5 questions each)")
    parser.add_argument("--steps", type=int, help=f"default: {EXPERIMENT_STEPS}; demo-model: {DEMO_STEPS}")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, help="torch threads per run (default: 1; demo-model: 2)")
    parser.add_argument("--vision-layers", type=int, help=f"the tower's layers (default: {shapes_model.VISION_LAYERS}; "
                        f"demo-model: {DEMO_VISION_LAYERS})")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--workdir", type=Path, help="data and runs (default: a temporary folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--records", type=Path, help="finished runs' records (default: RESULTS/shapes_runs)")
    parser.add_argument("--finished-only", action="store_true",
                        help="train nothing: summarise the runs of this recipe recorded so far")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", type=Path, default=DEMO_MODEL_DIR, help="demo-model: where the checkpoint goes")
    parser.add_argument("--toy", action="store_true", help="tiny sizes: a smoke run of the whole pipeline")
    args = parser.parse_args(argv)
    demo = args.mode == "demo-model"
    args.variants = args.variants or ([DEMO_VARIANT] if demo else list(shapes_model.VARIANTS))
    args.threads = args.threads or (2 if demo else 1)
    args.steps = args.steps or (DEMO_STEPS if demo else EXPERIMENT_STEPS)
    args.vision_layers = args.vision_layers or (DEMO_VISION_LAYERS if demo else shapes_model.VISION_LAYERS)
    args.records = args.records or args.results / "shapes_runs"
    if args.toy:
        args.train_scenes, args.test_scenes, args.steps, args.batch_size = 4, 2, 2, 4
        args.seeds = args.seeds[:2]
    with tempfile.TemporaryDirectory(prefix="shapes_") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.mode == "demo-model":
            return demo_model(args, workdir)
        if args.mode == "one":
            result = train_and_evaluate(args.variant, args.seed, workdir, args)
            save_record(args, result)
            return result
        return experiment(args, workdir)


if __name__ == "__main__":
    main()

"""`tokenpacker-demo` with no arguments: the embedded checkpoint, trained on the shapes task (`shapes_task.py`),
answers questions about freshly generated pictures.

The parent process (this module) draws the scenes, renders them into a work folder with a `quiz.json` of questions,
and makes the embedded weights a full remote-code checkpoint there (its files plus this release's modules). A fresh
Python process that cannot import this package (`demo.py --quiz`) loads that checkpoint with
`trust_remote_code=True`, answers every question and writes the answers; the parent then prints each question,
answer and expected answer, and the accuracy. Not shipped inside checkpoints.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .remote_code import shipped_files
from .shapes_model import normalise
from .shapes_task import fresh_examples

# The shipped checkpoint: weights, config, tokenizer, processor and its recipe (`training.json`), without the remote
# code, which `embedded_checkpoint` adds from this release so that it never goes stale.
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"


def embedded_checkpoint(folder):
    """Copy the shipped checkpoint to `folder` and add this release's remote-code modules: -> `folder`."""
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"the embedded checkpoint is missing from {DEMO_MODEL_DIR}; reinstall the package or "
                                "rebuild it with `python benchmarks/shapes_experiment.py demo-model`.")
    shutil.copytree(DEMO_MODEL_DIR, folder, dirs_exist_ok=True)
    for name, path in shipped_files().items():
        shutil.copyfile(path, os.path.join(folder, name))
    return folder


def training_record():
    """The shipped checkpoint's recipe and measured test accuracy (`demo_model/training.json`)."""
    return json.loads((DEMO_MODEL_DIR / "training.json").read_text())


def write_quiz(folder, questions, seed):
    """Render `questions` fresh scenes drawn by `seed` into `folder`: -> (quiz.json path, examples)."""
    examples = fresh_examples(questions, seed)
    items = []
    for number, (scene, question, answer, kind) in enumerate(examples):
        image = os.path.join(folder, f"scene_{number:03d}.png")
        scene.render().save(image)
        items.append({"image": image, "question": question, "expected": answer, "kind": kind})
    path = os.path.join(folder, "quiz.json")
    Path(path).write_text(json.dumps(items, indent=1))
    return path, examples


def run_quiz(workdir, questions, seed, say=print):
    """The no-argument demo in `workdir`: returns the fresh process's exit status."""
    checkpoint = embedded_checkpoint(os.path.join(workdir, "shapes_tokenpacker"))
    record = training_record()
    say(f"checkpoint: {checkpoint} (the embedded {record['variant']} model, trained from scratch on the shapes task "
        f"in {record['train_wall_s'] / 60:.1f} min at {record['train_threads']} thread(s) on {record['machine']}; "
        f"test accuracy {record['test_accuracy']['all']:.0%} on {record['test_questions']} questions)")
    quiz, examples = write_quiz(workdir, questions, seed)
    say(f"quiz: {questions} questions about freshly generated pictures (seed {seed}; --seed {seed} repeats them), "
        f"images in {workdir}")
    say("reloading it in a fresh Python process that cannot import this package ...")
    answers_path = os.path.join(workdir, "answers.json")
    demo_script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    command = [sys.executable, demo_script, "--model", checkpoint, "--quiz", quiz, "--answers", answers_path]
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    status = subprocess.run(command, env=env, cwd=workdir).returncode
    if status:
        return status
    answers = json.loads(Path(answers_path).read_text())
    right = 0
    for number, ((_, question, expected, _), answer) in enumerate(zip(examples, answers), 1):
        hit = normalise(answer) == expected
        right += hit
        say(f"{number:>3}. {question:<62} answer: {answer.strip()!r:<12} expected: {expected!r:<10} "
            f"{'right' if hit else 'WRONG'}")
    say(f"accuracy: {right}/{len(examples)} = {right / len(examples):.0%} (the shipped model's measured test "
        f"accuracy: {record['test_accuracy']['all']:.0%})")
    return 0

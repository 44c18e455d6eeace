"""tokenpacker-train: the two stages, LoRA, the projector's own learning rate, self-contained outputs, resuming."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llama_processor import make_processor, sentencepiece_tokenizer
from modeling_tokenpacker.demo import build_tiny_model, synthesize_image
from modeling_tokenpacker.training.trainer import main
from test_remote_code import PROMPTS, run_child

CAPTIONS = ["a red car near the road", "two children on a bench", "the small dog on the grass", "a white horse"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tokenizer = sentencepiece_tokenizer()
    model = build_tiny_model(tokenizer)
    model.save_pretrained(root / "ckpt")
    make_processor(tokenizer, "pad", model.config.image_seq_length).save_pretrained(root / "ckpt")
    (root / "images").mkdir()
    rows = []
    for index, caption in enumerate(CAPTIONS):
        synthesize_image(200 + 40 * index, 150 + 30 * index).save(root / "images" / f"{index}.png")
        rows.append({"id": f"s{index}", "image": f"{index}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": caption}]})
    (root / "data.json").write_text(json.dumps(rows))
    return root


def run(setup, output, *extra):
    return main(["--model_name_or_path", str(setup / "ckpt"), "--data_path", str(setup / "data.json"),
                 "--image_folder", str(setup / "images"), "--output_dir", str(output), "--max_steps", "2",
                 "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--report_to", "none",
                 "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "true", "--seed", "0", *extra])


def changed(before, after, part):
    names = [name for name in before if part in name]
    assert names, part
    return any(not torch.equal(before[name], after[name]) for name in names)


def test_pretrain_trains_the_projector_only_and_saves_a_checkpoint_that_loads_as_remote_code(setup, tmp_path):
    before = load_file(setup / "ckpt" / "model.safetensors")
    trainer = run(setup, tmp_path / "out", "--stage", "pretrain")
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert changed(before, after, "multi_modal_projector")
    assert not changed(before, after, "language_model") and not changed(before, after, "vision_tower")
    assert not changed(before, after, "lm_head")
    image = tmp_path / "image.png"
    synthesize_image(300, 200).save(image)
    child = run_child(tmp_path / "out", [image, image], cwd=tmp_path)
    assert not child["imported_package"] and len(child["tokens"]) == len(PROMPTS)


def test_finetune_trains_projector_and_language_model_with_the_projector_learning_rate(setup, tmp_path):
    before = load_file(setup / "ckpt" / "model.safetensors")
    trainer = run(setup, tmp_path / "out", "--stage", "finetune", "--projector_lr", "2e-3",
                  "--group_by_modality_length", "true")
    groups = trainer.optimizer.param_groups
    projector = {id(p) for n, p in trainer.model.named_parameters() if "multi_modal_projector" in n}
    # `initial_lr`: the scheduler's starting rate per group (`lr` has decayed by the end of the run).
    assert all((group["initial_lr"] == 2e-3) == all(id(p) in projector for p in group["params"]) for group in groups)
    assert {group["initial_lr"] for group in groups} == {2e-3, 1e-2}
    assert sum(len(group["params"]) for group in groups if id(group["params"][0]) in projector) == len(projector)
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert changed(before, after, "multi_modal_projector") and changed(before, after, "language_model")
    assert not changed(before, after, "vision_tower")


def test_lora_finetune_saves_the_merged_model(setup, tmp_path):
    before = load_file(setup / "ckpt" / "model.safetensors")
    run(setup, tmp_path / "out", "--stage", "finetune", "--lora_r", "4", "--lora_alpha", "8")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before)  # merged: no adapter or base_layer names left
    assert changed(before, after, "language_model.layers.0.self_attn.q_proj")
    assert changed(before, after, "multi_modal_projector") and not changed(before, after, "vision_tower")


def test_qlora_trains_4bit_adapters_and_saves_them_merged_into_the_unquantized_model(setup, tmp_path):
    pytest.importorskip("bitsandbytes")
    before = load_file(setup / "ckpt" / "model.safetensors")
    trainer = run(setup, tmp_path / "out", "--stage", "finetune", "--lora_r", "4", "--lora_alpha", "8",
                  "--load_in_4bit", "true", "--max_steps", "3")
    kinds = {type(module).__name__ for name, module in trainer.model.named_modules() if name.endswith("q_proj.base_layer")}
    assert kinds == {"Linear4bit"}  # the language model was trained in 4 bits ...
    projector = [p for n, p in trainer.model.named_parameters() if "multi_modal_projector" in n]
    assert projector and all(p.dtype == torch.float32 for p in projector)  # ... the projector was not quantized
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before) and all(after[name].dtype == torch.float32 for name in after)
    assert changed(before, after, "language_model.layers.0.self_attn.q_proj")
    assert changed(before, after, "multi_modal_projector") and not changed(before, after, "vision_tower")


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_gradient_checkpointing_trains_the_same_steps_and_bf16_trains_close_to_them(setup, tmp_path):
    plain = run(setup, tmp_path / "plain", "--stage", "finetune", "--max_steps", "3")
    checkpointed = run(setup, tmp_path / "gc", "--stage", "finetune", "--max_steps", "3",
                       "--gradient_checkpointing", "true")
    assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    # Steps 2 and 3 follow the updates, so equal losses mean equal gradients through the recomputed layers.
    assert len(losses(plain)) == 3 and losses(checkpointed) == pytest.approx(losses(plain), rel=1e-5)
    bf16 = run(setup, tmp_path / "bf16", "--stage", "finetune", "--max_steps", "3", "--bf16", "true")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert losses(bf16) == pytest.approx(losses(plain), rel=0.05), (losses(bf16), losses(plain))


def test_a_run_resumes_from_its_trainer_checkpoint(setup, tmp_path):
    run(setup, tmp_path / "out", "--stage", "pretrain", "--save_strategy", "steps", "--save_steps", "1")
    assert (tmp_path / "out" / "checkpoint-2" / "modeling_tokenpacker.py").is_file()
    trainer = run(setup, tmp_path / "out", "--stage", "pretrain", "--max_steps", "3",
                  "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 3


def test_a_bad_stage_is_refused(setup, tmp_path):
    with pytest.raises(SystemExit, match="--stage must be one of"):
        run(setup, tmp_path / "out", "--stage", "pre-train")


def logged_losses(output, steps):
    state = json.loads((output / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


FSDP = ["--fsdp", "full_shard", "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})]


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(setup, processes, per_device, output, *extra):
    """tokenpacker-train under torchrun (finetune, 3 steps, sequential sampling, a checkpoint at step 3)."""
    import subprocess
    import sys

    args = ["--model_name_or_path", str(setup / "ckpt"), "--data_path", str(setup / "data.json"),
            "--image_folder", str(setup / "images"), "--output_dir", str(output), "--max_steps", "3",
            "--per_device_train_batch_size", str(per_device), "--learning_rate", "1e-2", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1", "--use_cpu",
            str(not torch.cuda.is_available()).lower(), "--seed", "0", "--stage", "finetune",
            "--train_sampling_strategy", "sequential", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m",
                           "modeling_tokenpacker.train", *args], capture_output=True, text=True, env=env, timeout=900)


def losses_and_engine(result, output):
    assert result.returncode == 0, result.stderr[-4000:]
    engine = next(line for line in result.stdout.splitlines() if line.startswith("tokenpacker-train:"))
    return logged_losses(output, 3), engine


@pytest.mark.parametrize("strategy", [
    "ddp", pytest.param("fsdp", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="accelerate enables FSDP only on accelerators"))])
def test_two_processes_give_the_losses_of_one_process_with_the_same_global_batch(setup, tmp_path, strategy):
    """torchrun with 2 processes (gloo on the CPU), 1 sample each, against 1 process with 2 samples: same data
    order (sequential sampling), same global batch, so the same loss per step up to the reduction order."""
    single, engine = losses_and_engine(launch(setup, 1, 2, tmp_path / "one"), tmp_path / "one")
    assert engine.endswith("1 process(es), one process")
    extra = FSDP if strategy == "fsdp" else ["--ddp_backend", "gloo"]
    double, engine = losses_and_engine(launch(setup, 2, 1, tmp_path / "two", *extra), tmp_path / "two")
    assert engine.endswith("2 process(es), " + strategy.upper())
    # Measured on the CPU: 6.7988148, 6.7454295, 5.9283800 in one process; 6.7988143, 6.7454295, 5.9283781 with DDP.
    assert len(single) == len(double) == 3 and double == pytest.approx(single, rel=1e-4), (single, double)


def test_deepspeed_zero2_over_two_processes_gives_the_losses_of_one_process(setup, tmp_path, monkeypatch):
    """Opt-in (needs `pip install deepspeed`; on the CPU it runs with DS_ACCELERATOR=cpu and gloo). Measured on
    the CPU: 6.7988148, 6.7454300, 5.9283714 against one process's 6.7988148, 6.7454295, 5.9283800."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                  "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                                  "gradient_clipping": "auto", "zero_allow_untested_optimizer": True}))
    if not torch.cuda.is_available() and "DS_ACCELERATOR" not in os.environ:
        monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    single, _ = losses_and_engine(launch(setup, 1, 2, tmp_path / "one"), tmp_path / "one")
    double, engine = losses_and_engine(launch(setup, 2, 1, tmp_path / "two", "--deepspeed", str(config)),
                                       tmp_path / "two")
    assert engine.endswith("2 process(es), DeepSpeed")
    assert double == pytest.approx(single, rel=1e-4), (single, double)


def test_fsdp_over_two_cpu_processes_gives_the_losses_of_one_process(setup, tmp_path):
    """FSDP2 (`fully_shard`, the engine accelerate runs for `--fsdp` with fsdp_version 2) works on the CPU with gloo,
    though accelerate enables it only on accelerators: tests/fsdp_worker.py shards the remote-code model as
    accelerate would and trains 3 steps with a global batch of 2."""
    import subprocess
    import sys

    worker = os.path.join(os.path.dirname(__file__), "fsdp_worker.py")
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"fsdp{processes}.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                                 "--master-addr", "127.0.0.1", "--master-port", str(free_port()), worker,
                                 str(setup / "ckpt"), str(setup / "data.json"), str(setup / "images"), str(out)],
                                capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        results[processes] = json.loads(out.read_text())
    sharded = results[2]
    assert sharded["world_size"] == 2 and sharded["sharded_parameters"] == sharded["parameters"] > 0
    assert results[1]["sharded_parameters"] == 0
    # Measured: 6.7988148, 6.7429242, 5.6979241 in one process; 6.7988148, 6.7429242, 5.6979246 sharded.
    assert sharded["losses"] == pytest.approx(results[1]["losses"], rel=1e-4), (results[1], sharded)
    assert results[1]["losses"][2] < results[1]["losses"][0]  # it trains


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU FSDP is enabled (the test above)")
def test_fsdp_on_the_cpu_is_refused_instead_of_running_as_ddp(setup, tmp_path):
    """accelerate enables FSDP only on accelerators and would otherwise train with DDP without saying so."""
    result = launch(setup, 1, 1, tmp_path / "one", *FSDP)  # one process is enough to be refused
    assert result.returncode != 0 and "accelerate did not enable FSDP" in result.stderr, result.stderr[-3000:]

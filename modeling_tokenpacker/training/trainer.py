"""`tokenpacker-train`: the original's two training stages on 🤗 `Trainer`, every `TrainingArguments` flag included.

    tokenpacker-train --model_name_or_path CKPT --stage pretrain --data_path blip_558k.json --image_folder IMAGES \\
        --output_dir OUT --per_device_train_batch_size 32 --learning_rate 1e-3 --bf16 true
    tokenpacker-train --model_name_or_path OUT --stage finetune --data_path mix665k.json --image_folder IMAGES \\
        --output_dir OUT2 --learning_rate 2e-5 --projector_lr 2e-5 --gradient_checkpointing true [--lora_r 128]

`--stage pretrain`: vision tower and language model frozen, the projector trained, `plain` labels (the caption).
`--stage finetune`: vision tower frozen, projector and language model trained (or, with `--lora_r N`, LoRA
adapters on the language model's linear layers and the whole projector; `--load_in_4bit` for QLoRA), `vicuna_v1`
labels. The output folder is a self-contained checkpoint (weights, remote code, processor, chat template; LoRA
merged into the weights), and `--resume_from_checkpoint` continues a run from its `checkpoint-N` folders.
`--group_by_modality_length true` samples batches of one modality and similar length as the original. Runs under
`torchrun` / `accelerate launch` with DDP, FSDP (on accelerators: accelerate enables it nowhere else, and `--fsdp` on
the CPU is refused) or a DeepSpeed config, as `TrainingArguments` takes them.
"""

import dataclasses
import os
import sys
from typing import Optional

import torch
import transformers
from packaging.version import Version
from transformers import AutoModelForImageTextToText, AutoProcessor, HfArgumentParser, Trainer, TrainingArguments

from .collator import TokenPackerDataCollator
from .data import ConversationDataset, ExampleBuilder
from .grouping import ModalityLengthGroupedSampler

STAGE_TEMPLATES = {"pretrain": "plain", "finetune": "vicuna_v1"}
LANGUAGE_MODEL_LINEAR = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass
class ModelArguments:
    model_name_or_path: str = dataclasses.field(metadata={"help": "a TokenPacker checkpoint (folder or Hub repo)"})
    stage: str = dataclasses.field(default="finetune", metadata={"help": "pretrain (projector only) or finetune"})
    projector_lr: Optional[float] = dataclasses.field(default=None, metadata={
        "help": "learning rate of the projector (the original's mm_projector_lr); default: --learning_rate"})
    lora_r: int = dataclasses.field(default=0, metadata={"help": "LoRA rank on the language model (0: full)"})
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    load_in_4bit: bool = dataclasses.field(default=False, metadata={"help": "QLoRA: the language model in 4-bit"})
    train_vision_tower: bool = False


@dataclasses.dataclass
class DataArguments:
    data_path: str = dataclasses.field(metadata={"help": "LLaVA JSON / JSON Lines file"})
    image_folder: Optional[str] = None
    template: Optional[str] = dataclasses.field(default=None, metadata={
        "help": "vicuna_v1 or plain; default: plain for pretrain, vicuna_v1 for finetune"})
    model_max_length: int = 2048
    on_bad_sample: str = dataclasses.field(default="raise", metadata={"help": "raise or skip"})
    truncate: bool = dataclasses.field(default=True, metadata={"help": "cut long samples as the original does"})
    group_by_modality_length: bool = dataclasses.field(default=False, metadata={
        "help": "batches of one modality (image or text-only) and similar estimated length, as the original"})


class TokenPackerTrainer(Trainer):
    """`Trainer` whose optimizer gives the projector its own learning rate (the groups Trainer builds, with the
    projector's parameters moved into groups of their own) and that, with `group_by_modality_length`, samples
    batches as the original's `LengthGroupedSampler(group_by_modality=True)` does (`grouping.py`)."""

    def __init__(self, *args, projector_lr=None, group_by_modality_length=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_lr = projector_lr
        self.group_by_modality_length = group_by_modality_length

    def _get_train_sampler(self, *args, **kwargs):
        # Trainer's hook: no argument up to transformers 4.5x, `train_dataset` since.
        dataset = (args[0] if args else kwargs.get("train_dataset")) or self.train_dataset
        if not self.group_by_modality_length:
            return super()._get_train_sampler(*args, **kwargs)
        if not hasattr(dataset, "modality_lengths"):
            raise ValueError("group_by_modality_length needs a dataset with `modality_lengths` (ConversationDataset); "
                             f"got {type(dataset).__name__}.")
        # The original's world size: processes x gradient accumulation steps, so every optimizer step is grouped.
        return ModalityLengthGroupedSampler(
            dataset.modality_lengths, self.args.train_batch_size,
            world_size=self.args.world_size * self.args.gradient_accumulation_steps)

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.projector_lr is None:
            return optimizer
        projector = {id(p) for name, p in (model or self.model).named_parameters() if "multi_modal_projector" in name}
        moved = []
        for group in optimizer.param_groups:
            mine = [p for p in group["params"] if id(p) in projector]
            group["params"] = [p for p in group["params"] if id(p) not in projector]
            if mine:
                moved.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine,
                              "lr": self.projector_lr, "initial_lr": self.projector_lr})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]] + moved
        return optimizer


def load_model(model_args, training_args):
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
    # `dtype` from transformers 4.56 on, `torch_dtype` before (setup.cfg allows 4.46).
    dtype_name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    kwargs = {"trust_remote_code": True, dtype_name: dtype}
    if model_args.load_in_4bit:
        if not model_args.lora_r:
            raise SystemExit("--load_in_4bit trains LoRA adapters (QLoRA): give --lora_r too.")
        from transformers import BitsAndBytesConfig

        # No skip list: the model's default keeps the vision tower, the projector and lm_head unquantized, in the
        # name forms every transformers release matches (a short list here quantized the projector on 5.x).
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
    return AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **kwargs)


def prepare_trainable(model, model_args):
    """Freeze as the stage says; with --lora_r, wrap the model in PEFT (projector fully trained, saved with it)."""
    if model_args.stage not in STAGE_TEMPLATES:
        raise SystemExit(f"--stage must be one of {sorted(STAGE_TEMPLATES)}; got {model_args.stage!r}.")
    model.requires_grad_(False)
    model.model.multi_modal_projector.requires_grad_(True)
    if model_args.train_vision_tower:
        model.model.vision_tower.requires_grad_(True)
    if model_args.stage == "pretrain":
        return model
    if not model_args.lora_r:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                        target_modules=LANGUAGE_MODEL_LINEAR, modules_to_save=["multi_modal_projector"])
    return get_peft_model(model, config)


def save_checkpoint(trainer, model_args, processor, output_dir):
    """A self-contained checkpoint in output_dir (every rank calls this: FSDP gathers the weights collectively).
    LoRA is merged into the weights, for QLoRA into the base model reloaded unquantized."""
    if not model_args.lora_r:
        trainer.save_model(output_dir)
    elif trainer.is_world_process_zero():
        model = trainer.model
        if model_args.load_in_4bit:
            from peft import PeftModel

            adapter_dir = os.path.join(output_dir, "adapter")
            model.save_pretrained(adapter_dir)
            base = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
            model = PeftModel.from_pretrained(base, adapter_dir)
        model.merge_and_unload().save_pretrained(output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(output_dir)


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        parse = parser.parse_json_file if argv[0].endswith(".json") else parser.parse_yaml_file
        model_args, data_args, training_args = parse(os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the examples are built by ExampleBuilder, not by columns
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, trust_remote_code=True)
    model = prepare_trainable(load_model(model_args, training_args), model_args)
    builder = ExampleBuilder(processor, data_args.template or STAGE_TEMPLATES[model_args.stage],
                             image_folder=data_args.image_folder, model_max_length=data_args.model_max_length,
                             truncate=data_args.truncate, on_bad_sample=data_args.on_bad_sample)
    trainer = TokenPackerTrainer(
        model=model, args=training_args, train_dataset=ConversationDataset(data_args.data_path, builder),
        data_collator=TokenPackerDataCollator.from_processor(processor, padding_side="right"),
        projector_lr=model_args.projector_lr, group_by_modality_length=data_args.group_by_modality_length)
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        raise SystemExit("--fsdp was given but accelerate did not enable FSDP: it does so only on accelerators "
                         "(CUDA, XPU, NPU, HPU, ...), and on the CPU it would train without it (with DDP or in one process).")
    if trainer.is_world_process_zero():
        engine = ("FSDP" if trainer.is_fsdp_enabled else "DeepSpeed" if trainer.is_deepspeed_enabled
                  else "DDP" if training_args.world_size > 1 else "one process")
        print(f"tokenpacker-train: stage {model_args.stage}, {builder.labels.template} labels, "
              f"{training_args.world_size} process(es), {engine}", flush=True)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    save_checkpoint(trainer, model_args, processor, training_args.output_dir)
    return trainer


if __name__ == "__main__":
    main()

"""One process of an FSDP run on the CPU (gloo), started by torchrun from test_training_cli.py.

    python -m torch.distributed.run --nproc-per-node N tests/fsdp_worker.py CKPT DATA_JSON IMAGE_FOLDER OUT_JSON

accelerate (and so Trainer) enables FSDP only on accelerators; this does by hand what its FSDP2 path does there:
`fully_shard` on every module class of the model's `_no_split_modules` (the vision and language layers, the
projector), then on the root. The checkpoint is loaded as remote code; the stage is `finetune` (vision tower frozen).
Each step takes a global batch of 2 samples, split over the processes; the loss is the mean over the global batch's
label tokens, so one process and N processes train on the same objective. Rank 0 writes the losses to OUT_JSON.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForImageTextToText, AutoProcessor

from modeling_tokenpacker.training import (IGNORE_INDEX, ConversationDataset, ExampleBuilder,
                                           TokenPackerDataCollator)

GLOBAL_BATCH, STEPS, LEARNING_RATE = 2, 3, 1e-2


def shard(model):
    """FSDP2 over `_no_split_modules`, then the root; returns how many parameters are sharded DTensors."""
    classes = set(model._no_split_modules)
    for module in list(model.modules()):
        if type(module).__name__ in classes:
            fully_shard(module)
    fully_shard(model)
    return sum(isinstance(parameter, DTensor) for parameter in model.parameters())


def main(checkpoint, data_path, image_folder, out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, trust_remote_code=True).train()
    model.model.vision_tower.requires_grad_(False)
    sharded = shard(model) if world > 1 else 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    dataset = ConversationDataset(data_path, ExampleBuilder(processor, "vicuna_v1", image_folder=image_folder))
    collate = TokenPackerDataCollator.from_processor(processor)
    losses = []
    for step in range(STEPS):
        first = step * GLOBAL_BATCH
        mine = range(first + rank, first + GLOBAL_BATCH, world)
        batch = collate([dataset[index % len(dataset)] for index in mine])
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, :-1].float()
        targets = labels[:, 1:]
        local_sum = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                                      reduction="sum")
        tokens = (targets != IGNORE_INDEX).sum()
        dist.all_reduce(tokens)
        # FSDP averages gradients over the processes: scale back to the global batch's token mean.
        (local_sum * world / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        total = local_sum.detach().clone()
        dist.all_reduce(total)
        losses.append((total / tokens).item())
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"losses": losses, "world_size": world, "sharded_parameters": sharded,
                       "parameters": sum(1 for _ in model.parameters())}, handle)
    # Both processes alive until the end: one that leaves early can abort the other's gloo threads at exit.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

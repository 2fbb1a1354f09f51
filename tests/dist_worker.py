"""Run under torchrun by test_recipe: train, then dump this rank's losses and final trainable weights."""

import json
import sys

import torch
import torch.distributed as dist

from llava_edge.train.recipe import TrainConfig, train

cfg = TrainConfig(**json.loads(sys.argv[1]))
result = train(cfg)
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save({"history": result["history"], "trainable": result["trainable"]}, f"{cfg.output_dir}/rank{rank}.pt")
if dist.is_initialized():
    dist.destroy_process_group()

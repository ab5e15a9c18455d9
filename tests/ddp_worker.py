"""Run by test_ddp.py under torchrun-like env vars: one stage-2 epoch, then save params."""

import sys

import torch

from efpn.config import load_config
from efpn.engine.train import Trainer

cfg_path, out, result = sys.argv[1], sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
trainer = Trainer(load_config(cfg_path), out, quiet=True)
trainer.run_stage(2, init=sys.argv[4])
if torch.distributed.is_initialized():
    rank = torch.distributed.get_rank()
else:
    rank = 0
if rank == 0:
    model_state = torch.load(f"{out}/stage2/last.pt", weights_only=True)["model"]
    torch.save(
        {k: v for k, v in model_state.items() if k.startswith("backbone.extension.")}, result
    )

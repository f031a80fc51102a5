"""Run under torchrun (2 processes, gloo): full adapter and optimizer states go into FSDP2 shards
of uneven sizes and come back out equal. Prints one line per rank: '<rank> ok' or what differed."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from fullscale import sharding

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 7))   # 3 and 7 rows: uneven shards
fully_shard(model)
full = {n: torch.randn(p.shape) for n, p in model.named_parameters()}
sharding.load_trainable_state(model, full)
got = sharding.trainable_state(model)
problems = [n for n in full if not torch.equal(got[n], full[n])]

optimizer = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 5)).sum().backward()
optimizer.step()
saved = sharding.optimizer_state(optimizer)
fresh = torch.optim.AdamW(model.parameters())
sharding.load_optimizer_state(fresh, {"state": {i: dict(s) for i, s in saved["state"].items()},
                                      "param_groups": saved["param_groups"]})
again = sharding.optimizer_state(fresh)
problems += [f"optimizer {i}.{k}" for i in saved["state"] for k in saved["state"][i]
             if not torch.equal(saved["state"][i][k], again["state"][i][k])]
print(f"{rank} {'ok' if not problems else problems}", flush=True)
dist.destroy_process_group()
sys.stdout.flush()
os._exit(1 if problems else 0)   # no interpreter teardown (it can abort with gloo's threads around)

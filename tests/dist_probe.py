"""A tiny torch.distributed program for tests/test_distributed.py: detect(), gloo all_reduce, print JSON.

Run under ``srun -n 2`` (as a script) or submitted through submitit (``probe()``)."""
from __future__ import annotations

import json
import os


def probe() -> dict:
    import torch
    import torch.distributed as dist

    from hpcvid.launch.distributed import detect

    torch.set_num_threads(1)
    env = detect()
    env.export()
    dist.init_process_group("gloo", init_method="env://", rank=env.rank, world_size=env.world_size)
    try:
        value = torch.tensor([float(env.rank + 1)])
        dist.all_reduce(value)
    finally:
        dist.destroy_process_group()
    return {"rank": env.rank, "world": env.world_size, "local_rank": env.local_rank, "source": env.source,
            "master": f"{env.master_addr}:{env.master_port}", "sum": value.item(), "pid": os.getpid()}


if __name__ == "__main__":
    print(json.dumps(probe()), flush=True)

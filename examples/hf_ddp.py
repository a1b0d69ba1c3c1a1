"""The Hugging Face example under DDP: two processes on the CPU (gloo), one ``EWCCallback`` each.

Each rank trains on its half of every batch; when a task ends, each consolidates from its own
shard of the training data and :func:`ewc.fisher_diagonal` all-reduces the sums, so every rank
holds the Fisher of all the data and adds the same penalty::

    torchrun --standalone --nproc_per_node 2 examples/hf_ddp.py [--out result.json]

Rank 0 prints (and writes to ``--out``) task A's and B's test accuracies for naive fine-tuning
and for EWC, the number of ranks, and the largest difference between the ranks' importances
(0: identical).
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist
from hf_two_tasks import LAM, two_tasks

from ewc.integrations.huggingface import EWCCallback

#: Per-process batch size: two processes make the single-process example's batches of 32.
BATCH = 16


def rank_spread(callback: EWCCallback) -> float:
    """The largest difference, over all entries, between the ranks' merged importances."""
    assert callback.regularizer is not None
    mine = torch.cat([v.flatten() for v in callback.regularizer.importance.values()])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return max(float((other - mine).abs().max()) for other in every)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="write the result as JSON here (rank 0)")
    cli = parser.parse_args()
    torch.set_num_threads(1)
    ddp = {"ddp_backend": "gloo", "per_device_train_batch_size": BATCH}
    naive = two_tasks([], **ddp)
    callback = EWCCallback(lam=LAM)
    kept = two_tasks([callback], **ddp)
    spread = rank_spread(callback)
    result = {"naive": naive, "EWC": kept, "rank spread": spread, "ranks": dist.get_world_size()}
    if dist.get_rank() == 0:
        print(json.dumps(result))
        if cli.out:
            with open(cli.out, "w") as f:
                json.dump(result, f)
    dist.destroy_process_group()  # before exit: gloo can abort a rank whose peer left first

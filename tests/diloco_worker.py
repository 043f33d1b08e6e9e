"""Run under mpirun by test_diloco.py (on simulated hosts): trains a tiny model with
parallel.sync=diloco through the Trainer that distgpt.train drives, and records on every rank what
each outer sync read and wrote of the rank's slice, so the test can recompute the outer step from
those saved states alone.

    python tests/diloco_worker.py CONFIG OUT_DIR [key=value ...]    -> OUT_DIR/rank_R.npz
"""

import sys
from pathlib import Path

import numpy as np

from distgpt import data, dist
from distgpt.config import load_config
from distgpt.trainer import Trainer, initial_params

config, out = sys.argv[1], Path(sys.argv[2])
cfg = load_config(config, sys.argv[3:])
comm = dist.init()
cfg, params = initial_params(cfg)
trainer = Trainer(cfg, comm, params)
trainer.broadcast_params()
outer = trainer.outer
t = cfg.train
shards = data.open_shards(cfg.data.train, cfg.model.vocab_size, "bytes", what="data.train")
loader = data.TrainLoader(shards, t.seq_len, t.batch_size, t.micro_batch_size, comm.rank, comm.size, t.seed)

records: dict[str, list] = {k: [] for k in ("step", "g0", "m0", "p0", "g1", "m1", "p1", "norm")}
sync = outer.sync


def recorded_sync(flat: np.ndarray, step_done: int):
    """OuterSync.sync, with its inputs and outputs of this rank's slice kept."""
    lo, hi = outer.lo, outer.hi
    before = outer.global_.copy(), outer.momentum.copy(), flat[lo:hi].copy()
    stats = sync(flat, step_done)
    after = outer.global_.copy(), outer.momentum.copy(), flat[lo:hi].copy()
    for key, value in zip(records, (step_done, *before, *after, stats.norm), strict=True):
        records[key].append(value)
    return stats


outer.sync = recorded_sync
for step in range(t.max_steps):
    trainer.step(step, loader.micro_batches(step))
np.savez(out / f"rank_{comm.rank}.npz", node=comm.node_index, local=comm.local_rank, lo=outer.lo,
         hi=outer.hi, **{k: np.array(v) for k, v in records.items()})

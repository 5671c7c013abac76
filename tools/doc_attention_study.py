"""DOC_ATTENTION's cost on the portable kernel (SDPA with a dense mask) against plain causal SDPA, on a CPU.

1. The shards' document lengths, and the fraction of a causal attention's 128 x 128 blocks that a document mask keeps
   at seq 2048 (what a block-sparse kernel such as flex_attention skips on a GPU), rows cut from the train stream as
   TrainLoader cuts them.
2. Forward + backward step time of a small GPT (train_gpt's own model; shape from the environment as train_gpt.py
   reads it), eager and compiled, DOC_ATTENTION off and on, on rows of real train tokens; the two interleaved.

    OMP_NUM_THREADS=1 python tools/doc_attention_study.py --data /work/shared/data/fineweb_proxy_sp1024
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as T  # noqa: E402

SHAPE = {"NUM_LAYERS": "2", "MODEL_DIM": "512", "RECUR_LAYERS": "", "VE_LAYERS": "", "PARALLEL_START": "0"}


def document_lengths(tokens: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(tokens == T.BOS_ID)
    return np.diff(np.append(starts, len(tokens)))


def kept_block_fraction(tokens: np.ndarray, seq_len: int, block: int = 128) -> float:
    """Of the causal (q block >= k block) pairs, the share holding a query and an earlier key of one document."""
    n = block_count = seq_len // block
    rows = tokens[:len(tokens) // seq_len * seq_len].reshape(-1, seq_len)
    docs = np.cumsum(rows == T.BOS_ID, axis=1)
    first, last = docs[:, ::block], docs[:, block - 1::block]       # doc ids are non-decreasing along a row
    keep = last[:, None, :] >= first[:, :, None]                     # [row, q block, k block]
    causal = np.tril(np.ones((n, n), dtype=bool))
    return float((keep & causal).sum() / (causal.sum() * len(rows))) if block_count else 0.0


def step_seconds(model, fwd, x: torch.Tensor, run: T.Run) -> float:
    t = time.perf_counter()
    with run.autocast():
        loss = fwd(x[:, :-1], x[:, 1:])
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def time_model(tokens: np.ndarray, seq_len: int, batch: int, compiled: bool, steps: int) -> dict:
    env = dict(SHAPE, TRAIN_SEQ_LEN=str(seq_len), COMPILE="1" if compiled else "0",
               AUTOCAST="bf16" if compiled else "off")
    env.update({k: os.environ[k] for k in ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS") if k in os.environ})
    cfg, _ = T.config_from_env(env)
    run = T.start_run(env, cfg)
    x = torch.from_numpy(tokens[:batch * (seq_len + 1)].astype(np.int64)).view(batch, seq_len + 1)
    models, times = {}, {False: [], True: []}
    for on in (False, True):
        torch.manual_seed(0)
        model = T.GPT(dataclasses.replace(cfg, doc_attention=on))
        fwd = run.compile(model, fullgraph=True)
        for _ in range(2):      # compile and warm up
            step_seconds(model, fwd, x, run)
        models[on] = (model, fwd)
    for _ in range(steps):      # interleaved: the other engineer's load hits both alike
        for on in (False, True):
            times[on].append(step_seconds(*models[on], x, run))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return dict(seq_len=seq_len, batch=batch, compiled=compiled, off_s=off, on_s=on, cost=on / off - 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="a folder of fineweb_{train,val}_*.bin shards (sp1024)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="logs/doc_attention/study.json")
    args = ap.parse_args()
    train = np.concatenate([T.read_shard(p, 1024) for p in sorted(glob.glob(f"{args.data}/fineweb_train_*.bin"))])
    val = T.read_shard(sorted(glob.glob(f"{args.data}/fineweb_val_*.bin"))[0], 1024)
    out = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
               shape=SHAPE, lengths={}, kept_blocks_2048={}, timings=[])
    for name, tokens in (("train", train), ("val", val)):
        n = document_lengths(tokens)
        out["lengths"][name] = dict(docs=len(n), mean=float(n.mean()), **{f"p{q}": float(np.percentile(n, q))
                                                                          for q in (0, 10, 50, 90, 100)})
        out["kept_blocks_2048"][name] = kept_block_fraction(tokens, 2048)
        print(name, out["lengths"][name], "kept blocks at 2048:", round(out["kept_blocks_2048"][name], 4))
    for seq_len, compiled in ((1024, False), (2048, False), (2048, True)):
        r = time_model(train, seq_len, 2, compiled, args.steps)
        out["timings"].append(r)
        print(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

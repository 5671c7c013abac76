"""Run under torchrun (gloo, CPU): the sharded, DDP-free training step against the step it replaced
(tests/reference_ddp_muon.py), from the same weights on the same batches, across the recurrence and QAT switches.
Rank 0 writes a JSON to PARITY_OUT: the largest weight difference of each comparison and the bytes sent per step."""
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_gpt as T  # noqa: E402
from helpers import TINY_ENV  # noqa: E402
from reference_ddp_muon import reference_forward, reference_optimizers, reference_step  # noqa: E402

STEPS = 6
STATES = [(False, False), (False, False), (True, False), (True, False), (True, True), (True, True)]   # the switches


def batches(cfg, run, grad_accum, local_tokens, step):
    """The micro-batches of one step for this rank: the global batch is the same on every world size."""
    g = torch.Generator().manual_seed(1000 + step)
    full = torch.randint(2, cfg.vocab_size, (T.REFERENCE_GPUS, local_tokens * run.world_size * grad_accum
                                             // T.REFERENCE_GPUS + 1), generator=g)
    mine = full.view(run.world_size, grad_accum, -1)[run.rank]
    return [(row[:-1].view(-1, cfg.train_seq_len), row[1:].view(-1, cfg.train_seq_len)) for row in mine]


def train(cfg, run, kind: str, clip: float):
    torch.manual_seed(cfg.seed)
    model = T.GPT(cfg).double()   # float64: a reordered sum changes the weights by ~1e-16, not ~1e-7
    with torch.no_grad():   # noise on every weight: zero-initialised projections would hide most of the network
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    grad_accum, local_tokens = T.batch_split(cfg, run)
    if kind == "reference":
        opts, fwd = reference_optimizers(model, cfg, run), reference_forward(model, run)
    else:
        opts, fwd = T.build_optimizers(model, cfg, run), model
    run.sent.clear()
    for step in range(STEPS):
        T.set_switches(model, cfg, STATES[step])
        T.set_schedule(opts, cfg, step, step / STEPS)
        b = batches(cfg, run, grad_accum, local_tokens, step)
        if kind == "reference":
            reference_step(fwd, opts, b, run, clip, list(model.parameters()))
        else:
            T.train_step(fwd, opts, b, run, clip)
    return [p.detach().clone() for p in model.parameters()], {k: v // STEPS for k, v in run.sent.items()}


def gap(a, b) -> float:
    """The largest |difference| over all weights, relative to the largest weight."""
    return max(float((x - y).abs().max()) for x, y in zip(a, b)) / max(float(x.abs().max()) for x in a)


def main() -> None:
    cfg, _ = T.config_from_env(dict(TINY_ENV, TRAIN_BATCH_TOKENS="1024", GRAD_CLIP_NORM="0.3"))
    run = T.start_run(os.environ, cfg)
    torch.set_num_threads(1)
    new, sent = train(cfg, run, "sharded", cfg.grad_clip_norm)
    ref, sent_ref = train(cfg, run, "reference", cfg.grad_clip_norm)
    unclipped, _ = train(cfg, run, "sharded", 0.0)
    # the weights must also be the same on every rank
    spread = max(float(T.Run.all_reduce(run, p.double().sum().view(1), dist.ReduceOp.MAX) -
                       -T.Run.all_reduce(run, -p.double().sum().view(1), dist.ReduceOp.MAX)) for p in new)
    # DDP all-reduces every gradient in the weights' dtype (here float64), as a ring: 2 (w-1)/w of the bytes
    ddp_bytes = sum(p.numel() * p.element_size() for p in ref) * 2 * (run.world_size - 1) // run.world_size
    if run.is_main:
        Path(os.environ["PARITY_OUT"]).write_text(json.dumps(dict(
            world=run.world_size, sharded_vs_reference=gap(new, ref), unclipped_vs_reference=gap(unclipped, ref),
            rank_spread=spread, sent_per_step=sent, reference_sent_per_step=dict(sent_ref, ddp_all_reduce=ddp_bytes))))
    del new, ref, unclipped
    gc.collect()     # the reference's DDP sits in reference cycles that hold the process group: free it first, or
    dist.destroy_process_group()   # gloo can abort a rank at exit ("terminate called without an active exception")


if __name__ == "__main__":
    main()

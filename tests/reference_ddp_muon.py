"""The training step as it was before Muon was sharded (git 2630845): DDP all-reduces every gradient in float32,
the global norm is clipped, and Muon orthogonalises a round-robin share of each shape group on each rank, then one
all-reduce of a flat buffer shares the updates. Kept only as the reference of tests/muon_parity.py."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.distributed as dist

import train_gpt as T


class ReferenceMuon(T.Muon):
    """A T.Muon for set_schedule (the momentum warm-up), with the old state and step."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, run) -> None:
        torch.optim.Optimizer.__init__(self, list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.run = run
        params = self.param_groups[0]["params"]
        self.offsets = np.cumsum([0] + [p.numel() for p in params]).tolist()
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            by_shape.setdefault(tuple(p.shape), []).append(i)
        order = [i for idx in by_shape.values() for i in idx]
        mine = {i for k, i in enumerate(order) if k % run.world_size == run.rank}
        self.shares = [s for s in ([i for i in idx if i in mine] for idx in by_shape.values()) if s]
        self.dtype = run.amp or self.param_groups[0]["params"][0].dtype
        self.flat = None

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        params, mom = group["params"], group["momentum"]
        if self.flat is None:
            self.flat = torch.zeros(self.offsets[-1], device=params[0].device, dtype=self.dtype)
        self.flat.zero_()
        for share in self.shares:
            grads = [params[i].grad for i in share]
            for i in share:
                if "momentum" not in self.state[params[i]]:
                    self.state[params[i]]["momentum"] = torch.zeros_like(params[i])
            bufs = [self.state[params[i]]["momentum"] for i in share]
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            g = torch.stack(grads).add_(torch.stack(bufs), alpha=mom)
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
            u = T.newton_schulz(g, dtype=self.dtype) * max(1.0, g.size(-2) / g.size(-1)) ** 0.5
            for j, i in enumerate(share):
                self.flat[self.offsets[i]:self.offsets[i + 1]] = u[j].reshape(-1)
        if self.run.distributed:
            self.run.count("muon_all_reduce", self.flat)
            dist.all_reduce(self.flat)
        for i, p in enumerate(params):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(self.flat[self.offsets[i]:self.offsets[i + 1]].view_as(p).to(p.dtype), alpha=-group["lr"])


def reference_optimizers(model, cfg, run) -> list[torch.optim.Optimizer]:
    """build_optimizers' groups and AdamW, with the reference Muon in place of the sharded one."""
    opts = []
    for o in T.build_optimizers(model, cfg, run):
        if isinstance(o, T.Muon):
            g = o.param_groups[0]
            o = ReferenceMuon(g["params"], lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"], run=run)
            o.param_groups[0].update(base_lr=g["base_lr"], label=g["label"])
        opts.append(o)
    return opts


class ZeroGradForUnused(torch.nn.Module):
    """DDP needs a gradient for every parameter: before the recurrence switch the old forward added
    0 x (iter_embed + iter_gate); this wrapper does the same around today's model."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, y):
        loss = self.model(x, y)
        if not self.model.recur_on and self.model.iter_embed is not None:
            loss = loss + 0.0 * (self.model.iter_embed.sum() + self.model.iter_gate.sum())
        return loss


def reference_forward(model, run):
    fwd = ZeroGradForUnused(model)
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        fwd = DDP(fwd, broadcast_buffers=False)
    return fwd


def reference_step(fwd, opts, batches, run, clip_norm, params) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i, (x, y) in enumerate(batches):
        sync = contextlib.nullcontext() if (not run.distributed or i == len(batches) - 1) else fwd.no_sync()
        with sync:
            loss = fwd(x, y)
            (loss / len(batches)).backward()
        total += loss.detach()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_norm, foreach=True)
    for opt in opts:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return total / len(batches)

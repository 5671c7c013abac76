"""The GPU-speed changes are numerics-neutral: batched Newton-Schulz, the bucketed Muon, the prefetched training step
and the bf16 residual stream, each against the plain form it replaced, on CPU in float32."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model


def newton_schulz_one(g, steps=5):
    """The per-matrix Newton-Schulz this project used before batching (one matrix, 2-D)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float() / (g.float().norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(6, 48, 48), (5, 96, 32), (3, 32, 96)])
def test_batched_newton_schulz_equals_one_matrix_at_a_time(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    batched = T.newton_schulz(g)
    for i in range(shape[0]):
        torch.testing.assert_close(batched[i], newton_schulz_one(g[i]), rtol=0, atol=1e-6)


def muon_reference(params, grads_per_step, lr, mom, wd, row_norm=True):
    """Muon as one loop over matrices: Nesterov momentum, row normalisation, Newton-Schulz, decoupled decay."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, buf in zip(params, grads, bufs):
            buf.mul_(mom).add_(g)
            u = g + mom * buf
            if row_norm:
                u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-7)
            u = newton_schulz_one(u) * max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * wd).add_(u, alpha=-lr)
    return params


def test_bucketed_muon_equals_the_per_matrix_loop():
    torch.manual_seed(0)
    shapes = [(32, 32), (16, 32), (32, 32), (64, 32), (32, 64), (16, 32), (32, 32)]   # three same-shape groups
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    steps = [[torch.randn(s) for s in shapes] for _ in range(3)]
    ref = muon_reference(params, steps, lr=0.02, mom=0.9, wd=0.04)
    opt = T.Muon(params, lr=0.02, momentum=0.9, weight_decay=0.04, run=T.Run())
    assert sorted(len(b) for b in opt.banks) == [1, 1, 2, 3]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=0, atol=1e-6)


def test_ranks_share_each_bank_out_evenly():
    """Rank r reduces and orthogonalises rows [r x per, (r+1) x per) of each bank, padded to a multiple of the world."""
    params = [torch.nn.Parameter(torch.zeros(8, 8)) for _ in range(5)] + [torch.nn.Parameter(torch.zeros(4, 8)) for _ in range(3)]
    opt = T.Muon(params, lr=0.1, momentum=0.9, weight_decay=0, run=T.Run(rank=1, world_size=4))
    (full8, shard8, out8), (full4, shard4, out4) = opt._buffers()
    assert [len(b) for b in opt.banks] == [5, 3]
    assert full8.shape == out8.shape == (8, 8, 8) and shard8.shape == (2, 8, 8), "5 matrices padded to 8: 2 per rank"
    assert full4.shape == (4, 4, 8) and shard4.shape == (1, 4, 8)


def test_sharded_step_matches_the_ddp_step_on_2_and_4_ranks(tmp_path):
    """tests/muon_parity.py under torchrun: the DDP-free sharded step against the DDP + round-robin Muon it replaced
    (tests/reference_ddp_muon.py), 6 steps across the recurrence and QAT switches, in float64. Reordered sums in
    float64 move the weights by ~1e-15 of their size; any change of the algorithm (the clip left out moves them by
    3e-3) is 1e9 times larger: 1e-12 separates the two."""
    sent = {}
    for world in (2, 4):
        out = tmp_path / f"parity{world}.json"
        env = dict(os.environ, PARITY_OUT=str(out), OMP_NUM_THREADS="1")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                            str(Path(__file__).parent / "muon_parity.py")], env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        got = json.loads(out.read_text())
        assert got["sharded_vs_reference"] < 1e-12, got
        assert got["unclipped_vs_reference"] > 1e-4, got
        assert got["rank_spread"] == 0, got
        after, before = sum(got["sent_per_step"].values()), sum(got["reference_sent_per_step"].values())
        assert set(got["sent_per_step"]) == {"reduce_scatter", "all_gather", "all_reduce"}
        assert after < before, got
        sent[world] = (before, after)
    print("bytes sent per rank per step (before, after):", sent)


class ListLoader:
    def __init__(self, batches):
        self.batches = list(batches)

    def next(self):
        return self.batches.pop(0)


def test_training_step_equals_the_plain_loop():
    """train_step over prefetched batches (with its on-device gradient clipping) against forward, backward, clip and
    step written out. Adam magnifies float rounding in tiny gradients, so the clip must be the same computation."""
    cfg, _ = T.config_from_env(dict(TINY_ENV, GRAD_CLIP_NORM="0.3"))
    model = tiny_model(dtype=torch.float32, scale=0.05).train()
    ref = tiny_model(dtype=torch.float32, scale=0.05).train()     # the same seed: the same weights (deepcopy drops labels)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(2, 320, (2, 32), generator=g), torch.randint(2, 320, (2, 32), generator=g)) for _ in range(8)]
    opts = T.build_optimizers(model, cfg, T.Run())
    ref_opts = T.build_optimizers(ref, cfg, T.Run())
    for step in range(2):
        chunk = batches[4 * step:4 * step + 4]
        loss = T.train_step(model, opts, ListLoader(chunk).batches, T.Run(), cfg.grad_clip_norm)
        total = 0.0
        for x, y in chunk:
            l = ref(x, y)
            (l / len(chunk)).backward()
            total += float(l.detach())
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.3)   # the standard clip, per-tensor kernels
        for o in ref_opts:
            o.step()
            o.zero_grad(set_to_none=True)
        assert float(loss) == pytest.approx(total / len(chunk), rel=1e-6)
        assert float(norm) > 0.3, "the clip must be active for this test to mean anything"
    for (n, p), r in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-6, msg=n)


def test_residual_stream_is_bf16_under_autocast_with_fp32_master_weights():
    model = tiny_model(dtype=torch.float32, scale=0.05)
    x = torch.randint(2, 320, (2, 32))
    fp32 = model.hidden(x)
    assert fp32.dtype == torch.float32 and model.embed(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = model.hidden(x)
        loss = model(x, x)
    assert model.embed(x).dtype == torch.float32, "outside autocast nothing changes"
    assert h.dtype == torch.bfloat16
    loss.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32) for p in model.parameters())
    torch.testing.assert_close(h.float(), fp32, rtol=0.05, atol=0.05 * float(fp32.abs().max()))

"""The causality harness for the evaluation (LEGAL_EVAL.md): the real eval code (windows, batching, SLOT, warm
start, rank sharding) on a tiny float64 model, keeping the full log-probability row of every scored target.

1. flip test: change token p, re-run everything; every scored t <= p must be bit-identical;
2. invariance: windows-per-batch 1 vs B, and 1 vs several simulated ranks, agree (warm start off);
3. coverage (each target once) and normalisation (each row a distribution over the whole vocabulary);
4. the harness bites: two deliberately leaky SLOT variants, kept in this file, must be caught.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from helpers import TINY_ENV, tiny_model

SEQ, STRIDE, BATCH, N = 24, 4, 5, 181   # 40 windows, 8 batches: every kind of boundary is present


@pytest.fixture(scope="module")
def setup():
    cfg, _ = T.config_from_env(TINY_ENV)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, cfg.vocab_size, (N,), generator=g)
    tokens[::23] = T.BOS_ID
    tables = T.ByteTables(torch.ones(cfg.vocab_size, dtype=torch.long), torch.zeros(cfg.vocab_size, dtype=torch.bool),
                          torch.arange(cfg.vocab_size) < 3)
    return model, tokens, tables


def scored_rows(model, tokens, tables, slot, batch=BATCH, ranks=1):
    """Run the real per-rank evaluation for each simulated rank; return {target index: log-prob row}."""
    windows = T.build_windows(len(tokens), SEQ, STRIDE)
    rows = {}
    for r in range(ranks):
        lo, hi = len(windows) * r // ranks, len(windows) * (r + 1) // ranks
        cap = []
        T.eval_shard(model, tokens, windows[lo:hi], tables, torch.device("cpu"), batch, slot=slot, capture=cap)
        for idx, logp in cap:
            for t, row in zip(idx.tolist(), logp):
                assert t not in rows, f"target {t} scored twice"
                rows[t] = row
    return rows


def flip_positions(ranks=1):
    """Targets inside slices, at window starts, at batch and rank boundaries, and the two ends."""
    w = T.build_windows(N, SEQ, STRIDE)
    pos = {1, N - 1, int(w[7, 0]), int(w[9, 2]) + 1}                # ends, a window start, inside a slice
    for b in (1, 4):
        pos |= {int(w[b * BATCH, 2]), int(w[b * BATCH - 1, 1])}   # first target of a batch, last of the one before
    for r in range(1, ranks):
        pos.add(int(w[len(w) * r // ranks, 2]))                   # first target of a rank
    return sorted(pos)


def flip_violations(model, tokens, tables, slot, ranks=1, batch=BATCH):
    """(p, t) pairs where changing token p changed the distribution used for some scored target t <= p."""
    base = scored_rows(model, tokens, tables, slot, batch, ranks)
    bad, moved = [], 0
    for p in flip_positions(ranks):
        flipped = tokens.clone()
        flipped[p] = 3 + (flipped[p] - 3 + 17) % (model.tok_emb.weight.size(0) - 3)
        rows = scored_rows(model, flipped, tables, slot, batch, ranks)
        bad += [(p, t) for t in range(1, p + 1) if not torch.equal(rows[t], base[t])]
        moved += sum(not torch.equal(rows[t], base[t]) for t in range(p + 1, N))
    assert moved > 0, "the flips changed nothing at all: the harness would prove nothing"
    return bad


SLOTS = {
    "adamw": T.Slot(steps=3, lr=0.05, lr_min=0.005, warm_start=0.0),
    "adamw_focal_nobias": T.Slot(steps=3, lr=0.05, lr_min=0.005, focal=5, bias=False, warm_start=0.0),
    "adamw_warm_start": T.Slot(steps=3, lr=0.05, lr_min=0.005, warm_start=0.9),
    "default": T.Slot(),   # the submitted settings (warm start on)
}


@pytest.mark.parametrize("name", ["plain", *SLOTS])
def test_flip_test_passes_on_the_real_code(setup, name):
    model, tokens, tables = setup
    assert flip_violations(model, tokens, tables, SLOTS.get(name)) == []


@pytest.mark.parametrize("name", ["adamw", "adamw_warm_start", "default"])
def test_flip_test_passes_across_simulated_ranks(setup, name):
    model, tokens, tables = setup
    assert flip_violations(model, tokens, tables, SLOTS[name], ranks=3) == []


@pytest.mark.parametrize("name", ["plain", *SLOTS])
def test_coverage_and_normalisation(setup, name):
    model, tokens, tables = setup
    rows = scored_rows(model, tokens, tables, SLOTS.get(name))
    assert sorted(rows) == list(range(1, N))
    lse = torch.stack([torch.logsumexp(r, 0) for r in rows.values()])
    assert all(r.shape == (model.tok_emb.weight.size(0),) and torch.isfinite(r).all() for r in rows.values())
    assert float(lse.abs().max()) < 1e-12


@pytest.mark.parametrize("name", ["plain", "adamw", "adamw_focal_nobias"])
def test_batch_and_rank_invariance(setup, name):
    model, tokens, tables = setup
    ref = scored_rows(model, tokens, tables, SLOTS.get(name), batch=1)
    for batch, ranks in ((BATCH, 1), (7, 1), (BATCH, 3), (2, 4)):
        rows = scored_rows(model, tokens, tables, SLOTS.get(name), batch=batch, ranks=ranks)
        for t in ref:
            torch.testing.assert_close(rows[t], ref[t], rtol=1e-11, atol=1e-12)


def test_warm_start_depends_on_batching_and_is_documented_so(setup):
    """With a warm start, a window starts from the previous batch's deltas: results change with the batch size and
    the rank split (still causal, see the flip tests). The README says exactly this."""
    model, tokens, tables = setup
    a = scored_rows(model, tokens, tables, SLOTS["adamw_warm_start"], batch=BATCH)
    b = scored_rows(model, tokens, tables, SLOTS["adamw_warm_start"], batch=2)
    assert any(not torch.allclose(a[t], b[t]) for t in a)


def test_first_window_is_scored_without_adaptation(setup):
    model, tokens, tables = setup
    plain = scored_rows(model, tokens, tables, None)
    slot = scored_rows(model, tokens, tables, SLOTS["adamw"])
    assert all(torch.equal(slot[t], plain[t]) for t in range(1, SEQ + 1))   # the first window has no context
    assert not torch.allclose(slot[SEQ + 1], plain[SEQ + 1])                 # later windows are adapted


def slow_reference(model, tokens, slot):
    """Each window alone: its own delta and bias, torch.optim.Adam on the mean NLL of its context targets."""
    rows = {}
    for s, e, f in T.build_windows(len(tokens), SEQ, STRIDE):
        x, y = tokens[s:e][None], tokens[s + 1:e + 1]
        with torch.no_grad():
            h = model.hidden(x)[0]
        lo = max(0, f - 1 - s - slot.focal) if slot.focal else 0
        ctx = torch.arange(lo, f - 1 - s)
        delta = torch.zeros(1, h.size(-1), dtype=h.dtype, requires_grad=True)
        bias = torch.zeros(1, model.tok_emb.weight.size(0), dtype=h.dtype, requires_grad=slot.bias)
        params = [delta, bias] if slot.bias else [delta]
        if len(ctx):
            opt = torch.optim.Adam(params, lr=slot.lr, betas=(0.9, 0.999), eps=1e-8)
            for k in range(slot.steps):
                for group in opt.param_groups:
                    group["lr"] = slot.lr_min + 0.5 * (slot.lr - slot.lr_min) * (1 + math.cos(math.pi * k / slot.steps))
                opt.zero_grad()
                F.cross_entropy(model.head(h[ctx] + delta) + bias, y[ctx]).backward()
                opt.step()
        with torch.no_grad():
            logp = torch.log_softmax(model.head(h[f - 1 - s:] + delta) + bias, -1)
        rows.update({s + 1 + j: logp[j - (f - 1 - s)] for j in range(f - 1 - s, e - s)})
    return rows


@pytest.mark.parametrize("name", ["adamw", "adamw_focal_nobias"])
def test_batched_adamw_equals_one_window_at_a_time(setup, name):
    model, tokens, tables = setup
    fast = scored_rows(model, tokens, tables, SLOTS[name])
    slow = slow_reference(model, tokens, SLOTS[name])
    assert sorted(fast) == sorted(slow)
    for t in fast:
        torch.testing.assert_close(fast[t], slow[t], rtol=1e-9, atol=1e-10)


def test_budget_guard_cuts_steps_to_meet_the_deadline(setup):
    model, tokens, tables = setup
    windows = T.build_windows(len(tokens), SEQ, STRIDE)
    import time
    out = T.eval_shard(model, tokens, windows, tables, torch.device("cpu"), 2, slot=T.Slot(steps=50, lr=0.05),
                       deadline=time.perf_counter() + 0.05)
    assert out.slot_steps_min < 50 and out.slot_step_sum < 50 * len(windows)
    assert out.tokens == N - 1   # cutting SLOT never drops a target

    budget = T.SlotBudget(steps=8, deadline=time.perf_counter() + 10.0)
    budget.observe(0, fwd_s=5.0, slot_s=5.0, steps=8)          # batch 0 (compilation) is ignored
    assert budget.plan(batches_left=10, batch_index=1) == 8
    budget.observe(1, fwd_s=0.5, slot_s=0.8, steps=8)           # 0.1 s per step
    assert budget.plan(batches_left=10, batch_index=2) in (4, 5)   # ~1.0 s per batch left: 0.5 + 5 x 0.1 fits
    budget.observe(2, fwd_s=2.0, slot_s=0.5, steps=5)
    assert budget.plan(batches_left=100, batch_index=3) == 0    # not even the forward fits: SLOT off


# ---- the harness must bite: two leaky variants of the real code --------------------------------------------------

def leaky_scored_slice_weights(first, width, focal):
    """'Standard' SLOT: optimize on the positions being scored (illegal: the delta sees the targets)."""
    pos = torch.arange(width)[None, :]
    scored = pos >= first[:, None]
    return scored / scored.sum(1, keepdim=True)


def leaky_shared_logits(model, h, delta, bias):
    """One delta (and bias) shared by the whole batch: the mean of the per-window parameters (illegal: the next
    window's context holds this window's scored tokens)."""
    logits = model.head(h + delta.mean(0, keepdim=True))
    return logits + bias.mean(0, keepdim=True) if bias is not None else logits


@pytest.mark.parametrize("target, leaky", [("slot_context_weights", leaky_scored_slice_weights),
                                           ("slot_logits", leaky_shared_logits)])
def test_harness_catches_leaky_variants(setup, monkeypatch, target, leaky):
    model, tokens, tables = setup
    monkeypatch.setattr(T, target, leaky)
    bad = flip_violations(model, tokens, tables, SLOTS["adamw"])
    assert bad, f"the harness did not catch the leaky variant {target}"
    if target == "slot_context_weights":
        assert any(p == t for p, t in bad), "scoring on optimized targets leaks each target into its own row"

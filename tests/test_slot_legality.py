"""The causality harness for the evaluation. The rule: the probability given to a scored target may depend only on
tokens before it, never on the target itself or anything after it. The harness runs the real eval code (windows,
batching, SLOT, warm start, score-first TTT, rank sharding) on a tiny float64 model, keeping the full
log-probability row of every scored target. The scores of the illegal SLOT variants below, and of the withdrawn
per-document TTT, are in logs/eval_study/README.md.

1. flip test: change token p, re-run everything; every scored t <= p must be bit-identical;
2. invariance: windows-per-batch 1 vs B, and 1 vs several simulated ranks, agree (warm start off);
3. coverage (each target once) and normalisation (each row a distribution over the whole vocabulary);
4. the harness bites: two deliberately leaky SLOT variants, a TTT that trains before it scores and a TTT that cuts
   its chunks at the BOS itself, kept in this file, must be caught.
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


class SimulatedRanks(T.Run):
    """`n` ranks' shares of the evaluation, all run in this one process (Run.eval_shares), in rank order."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def eval_shares(self) -> tuple[list[int], int]:
        return list(range(self.n)), self.n


def capturing(cap: list):
    """T.scored_log_probs, wrapped to keep (target indices, full log-probability rows) of every scored batch."""
    real = T.scored_log_probs

    def keep(logits, positions):
        logp = real(logits, positions)
        cap.append((positions.cpu(), logp.cpu()))
        return logp
    return keep


def captured_rows(run_eval):
    """Call run_eval() with T.scored_log_probs wrapped; return ({target index: log-prob row}, its result), asserting
    that no target is scored twice."""
    cap = []
    real, T.scored_log_probs = T.scored_log_probs, capturing(cap)
    try:
        result = run_eval()
    finally:
        T.scored_log_probs = real
    rows = {}
    for idx, logp in cap:
        for t, row in zip(idx.tolist(), logp):
            assert t not in rows, f"target {t} scored twice"
            rows[t] = row
    return rows, result


def scored_rows(model, tokens, tables, slot, batch=BATCH, ranks=1, ttt=None):
    """Run the real evaluation (evaluate: chunks, TTT, the simulated ranks' shares, SLOT, warm start) in this
    process; return {target index: log-prob row}."""
    geo, adapt = T.Geometry(SEQ, STRIDE, batch), T.Adaptation(slot=slot, ttt=ttt)
    return captured_rows(lambda: T.evaluate(model, tokens, tables, SimulatedRanks(ranks), geo, adapt))[0]


def flip_positions(ranks=1, ttt=None):
    """Targets inside slices, at window starts, at batch and rank boundaries, and the two ends; with TTT also at
    the first and last token of each chunk, inside a chunk, and at the rank boundaries within each chunk."""
    w = T.build_windows(N, SEQ, STRIDE)
    pos = {1, N - 1, int(w[7, 0]), int(w[9, 2]) + 1}                # ends, a window start, inside a slice
    for b in (1, 4):
        pos |= {int(w[b * BATCH, 2]), int(w[b * BATCH - 1, 1])}   # first target of a batch, last of the one before
    chunks = T.eval_chunks(torch.zeros(N, dtype=torch.long), w, ttt)
    for w0, w1, a, b in chunks:
        if ttt is not None:
            pos |= {a, b - 1, (a + b) // 2}
        for r in range(1, ranks):
            if w0 + (w1 - w0) * r // ranks < w1:
                pos.add(int(w[w0 + (w1 - w0) * r // ranks, 2]))     # first target of a rank's share
    return sorted(p for p in pos if 1 <= p < N)


def flips(tokens, positions, vocab):
    """(p, new token): another ordinary token at every position; also a BOS appearing at some of them (a document
    starts) and every BOS of the stream vanishing (a boundary goes), since anything keyed on BOS (smear, bigram,
    chunking) must stay causal too, and a BOS that is a window's first scored target is where a cut at BOS leaks."""
    out = [(p, 3 + (int(tokens[p]) - 3 + 17) % (vocab - 3)) for p in positions]
    out += [(p, T.BOS_ID) for p in positions[1::3] if tokens[p] != T.BOS_ID]
    return out + [(p, 3) for p in (tokens == T.BOS_ID).nonzero().flatten().tolist() if p > 0]


def flip_violations(model, tokens, tables, slot, ranks=1, batch=BATCH, ttt=None):
    """(p, t) pairs where changing token p changed the distribution used for some scored target t <= p."""
    base = scored_rows(model, tokens, tables, slot, batch, ranks, ttt)
    bad, moved = [], 0
    for p, new in flips(tokens, flip_positions(ranks, ttt), model.tok_emb.weight.size(0)):
        flipped = tokens.clone()
        flipped[p] = new
        rows = scored_rows(model, flipped, tables, slot, batch, ranks, ttt)
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
    the rank split (still causal, see the flip tests). logs/eval_study/README.md ("Legality") says exactly this."""
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
    """A deadline that 50 SLOT steps per window cannot meet: the rounds' agreed steps come down (the same on all three
    simulated ranks: one agreement per round), and no target is dropped."""
    model, tokens, tables = setup
    import time
    adapt = T.Adaptation(slot=T.Slot(steps=50, lr=0.05), deadline=time.perf_counter() + 0.3)
    r = T.evaluate(model, tokens, tables, SimulatedRanks(3), T.Geometry(SEQ, STRIDE, 1), adapt)
    assert r.slot_steps_min < 50 and r.slot_steps_mean < 50 and r.budget_cuts > 0
    assert r.tokens == N - 1   # cutting SLOT never drops a target

    budget = T.EvalBudget(deadline=time.perf_counter() + 10.0, steps=8, epochs=0, windows=110, tokens=0)
    budget.observe_batch(10, fwd_s=5.0, slot_s=5.0, steps=8)           # batch 1 (compilation) is not measured
    assert budget.plan("b") == (8, 0)
    budget.observe_batch(10, fwd_s=0.5, slot_s=0.8, steps=8)           # 0.05 s per window, 0.01 per window-step
    assert budget.plan("b")[0] == 6                                     # 90 x (0.05 + 7 x 0.01) = 10.8 > 10; 6 gives 9.9
    budget.observe_batch(10, fwd_s=20.0, slot_s=0.5, steps=5)
    assert budget.plan("b")[0] == 0                                     # not even the forward fits: SLOT off


def test_budget_guard_cuts_ttt_epochs_before_slot_steps():
    import time
    budget = T.EvalBudget(deadline=time.perf_counter() + 10.0, steps=4, epochs=3, windows=100, tokens=1000)
    for _ in range(2):
        budget.observe_batch(10, fwd_s=0.1, slot_s=0.4, steps=4)       # 0.01 s per window, 0.01 per window-step
        budget.observe_chunk(0.9, epochs=3, tokens=100)                # 0.003 s per epoch and target
    # 80 windows x 0.05 = 4 s of SLOT-on scoring + 800 targets x 3 x 0.003 = 7.2 s of TTT: over 10 s
    assert T.BUDGET_CUT_ORDER["stream"][0] == "ttt"
    steps, epochs = budget.plan("chunk")
    assert steps == 4 and epochs == 2 and budget.need(steps, epochs) <= 10.0


def test_slot_cut_to_zero_scores_plain_without_a_stale_warm_start(setup):
    """A fixed budget bug: with SLOT steps cut to 0, the warm start used to apply alpha x the last deltas."""
    model, tokens, tables = setup
    windows = T.build_windows(len(tokens), SEQ, STRIDE)
    state = T.RankEval(T.EvalBudget(None, 3, 0, len(windows), 0))
    state.budget.steps = 3
    plain, cut = [], []
    T.eval_shard(model, tokens, windows[:10], tables, T.Run(), BATCH, SLOTS["adamw_warm_start"], state)
    assert state.prev is not None, "a warm start is pending"
    state.budget.steps = 0                                               # as a cut to 0 leaves it
    real = T.scored_log_probs
    try:
        T.scored_log_probs = capturing(cut)
        T.eval_shard(model, tokens, windows[10:], tables, T.Run(), BATCH, SLOTS["adamw_warm_start"], state)
        T.scored_log_probs = capturing(plain)
        T.eval_shard(model, tokens, windows[10:], tables, T.Run(), BATCH, None,
                     T.RankEval(T.EvalBudget(None, 0, 0, len(windows) - 10, 0)))
    finally:
        T.scored_log_probs = real
    for (i1, r1), (i2, r2) in zip(cut, plain):
        assert torch.equal(i1, i2) and torch.equal(r1, r2)


# ---- the harness must bite: two leaky variants of the real code --------------------------------------------------

def leaky_scored_slice_weights(first, width, focal):
    """'Standard' SLOT: optimize on the positions being scored (illegal: the delta sees the targets)."""
    pos = torch.arange(width)[None, :]
    scored = pos >= first[:, None]
    return scored / scored.sum(1, keepdim=True)


def leaky_shared_logits(model, h, delta, bias, lora=None):
    """One delta (and bias) shared by the whole batch: the mean of the per-window parameters (illegal: the next
    window's context holds this window's scored tokens)."""
    logits = model.head(h + delta.mean(0, keepdim=True), lora)
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


# ---- score-first test-time training: the same harness, with the chunk loop and the weights that change --------

TTTS = {
    "all_weights": T.Ttt(epochs=2, chunk_tokens=48, lr=0.05, momentum=0.9, clip=1.0),
    "one_epoch": T.Ttt(epochs=1, chunk_tokens=37, lr=0.1, momentum=0.0, clip=1.0),   # chunks off the stride grid
    "document": T.Ttt(epochs=2, chunk_tokens=48, lr=0.05, momentum=0.9, clip=1.0, reset="document"),
}


@pytest.mark.parametrize("ttt", list(TTTS))
@pytest.mark.parametrize("slot", ["plain", "adamw_warm_start"])
def test_flip_test_passes_with_ttt(setup, ttt, slot):
    model, tokens, tables = setup
    assert flip_violations(model, tokens, tables, SLOTS.get(slot), ttt=TTTS[ttt]) == []


@pytest.mark.parametrize("ttt", ["all_weights", "one_epoch"])
def test_flip_test_passes_with_ttt_across_simulated_ranks(setup, ttt):
    model, tokens, tables = setup
    assert flip_violations(model, tokens, tables, SLOTS["adamw"], ranks=3, ttt=TTTS[ttt]) == []


def test_ttt_changes_the_scores_of_later_chunks_only(setup):
    """TTT must do something (or the flip tests above prove nothing about it): the first chunk is scored by the
    artifact's weights, later chunks by adapted ones; and the model is the artifact's again afterwards."""
    model, tokens, tables = setup
    before = [p.detach().clone() for p in model.parameters()]
    plain = scored_rows(model, tokens, tables, None)
    adapted = scored_rows(model, tokens, tables, None, ttt=TTTS["all_weights"])
    first_chunk_end = T.eval_chunks(tokens, T.build_windows(N, SEQ, STRIDE), TTTS["all_weights"])[0][1]
    w = T.build_windows(N, SEQ, STRIDE)
    last_of_chunk0 = int(w[first_chunk_end - 1, 1])
    assert all(torch.equal(adapted[t], plain[t]) for t in range(1, last_of_chunk0 + 1))
    assert sum(not torch.allclose(adapted[t], plain[t]) for t in range(last_of_chunk0 + 1, N)) > 50
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("ttt", ["all_weights", "one_epoch"])
def test_ttt_rank_invariance(setup, ttt):
    model, tokens, tables = setup
    ref = scored_rows(model, tokens, tables, SLOTS["adamw"], ttt=TTTS[ttt])
    for batch, ranks in ((BATCH, 3), (2, 4)):
        rows = scored_rows(model, tokens, tables, SLOTS["adamw"], batch=batch, ranks=ranks, ttt=TTTS[ttt])
        for t in ref:    # float64 sums in another order, through a few SGD steps: ~1e-8, where a wrong split is ~1e-2
            torch.testing.assert_close(rows[t], ref[t], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("ttt", list(TTTS))
def test_coverage_and_normalisation_with_ttt(setup, ttt):
    model, tokens, tables = setup
    rows = scored_rows(model, tokens, tables, SLOTS["default"], ttt=TTTS[ttt])
    assert sorted(rows) == list(range(1, N))
    assert float(torch.stack([torch.logsumexp(r, 0) for r in rows.values()]).abs().max()) < 1e-12


REAL_EVAL_CHUNKS = T.eval_chunks


def leaky_train_before_scoring(tokens, windows, ttt):
    """Train on a chunk, then score it (illegal): each chunk's training targets become the next chunk's, so the
    weights that score chunk c+1 have seen its tokens."""
    chunks = REAL_EVAL_CHUNKS(tokens, windows, ttt)
    return [(w0, w1, a, b) for (w0, w1, _, _), (_, _, a, b) in zip(chunks, chunks[1:] + chunks[-1:])]


def test_harness_catches_training_before_scoring(setup, monkeypatch):
    model, tokens, tables = setup
    monkeypatch.setattr(T, "eval_chunks", leaky_train_before_scoring)
    bad = flip_violations(model, tokens, tables, None, ttt=TTTS["all_weights"])
    assert bad, "the harness did not catch TTT that trains on a chunk before scoring it"
    assert any(p == t for p, t in bad), "a target's own row depends on itself"


def leaky_cut_at_bos(tokens, windows, ttt):
    """The first per-document TTT (illegal): a chunk starting *at* each BOS, so whether the BOS target is scored
    before or after training on the targets just before it depends on the BOS itself."""
    starts = np.union1d(np.arange(0, len(tokens), ttt.chunk_tokens), (tokens == T.BOS_ID).nonzero().flatten().numpy())
    owner = np.searchsorted(starts, windows[:, 2], side="right") - 1
    bounds = np.searchsorted(owner, np.arange(len(starts) + 1))
    return [(int(bounds[c]), int(bounds[c + 1]), max(1, int(starts[c])), int(starts[c + 1]) if c + 1 < len(starts)
             else len(tokens)) for c in range(len(starts))]


def test_harness_catches_chunks_cut_at_the_bos(setup, monkeypatch):
    model, tokens, tables = setup
    monkeypatch.setattr(T, "eval_chunks", leaky_cut_at_bos)
    bad = flip_violations(model, tokens, tables, None, ttt=TTTS["all_weights"])
    assert any(p == t and tokens[p] == T.BOS_ID for p, t in bad), "a BOS target's row depends on the BOS itself"

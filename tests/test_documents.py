"""The document evaluation mode against slow references that share none of its batching: every document scored alone
(chunk windows of its own tokens), LoRA as torch.optim.AdamW on one document at a time, SLOT as torch.optim.Adam on
one chunk at a time, phases that train only on what every rank has scored, the static balance, and the budget's
cut agreed by the simulated ranks. Causality (the flip test) is in test_document_legality.py."""
import contextlib
import math
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from helpers import TINY_ENV, tiny_model
from test_slot_legality import SimulatedRanks, captured_rows

SEQ, STRIDE, ROWS, N = 24, 4, 3, 181


def document_stream() -> tuple[torch.Tensor, T.ByteTables]:
    """N tokens of 11 documents (also shared by test_document_legality.py) and unit byte tables."""
    cfg, _ = T.config_from_env(TINY_ENV)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, cfg.vocab_size, (N,), generator=g)
    tokens[::23] = T.BOS_ID
    tokens[[40, 41, 150]] = T.BOS_ID                 # two BOS in a row (a 1-token document), a short document
    tables = T.ByteTables(torch.ones(cfg.vocab_size, dtype=torch.long), torch.zeros(cfg.vocab_size, dtype=torch.bool),
                          torch.arange(cfg.vocab_size) < 3)
    return tokens, tables


@pytest.fixture(scope="module")
def setup():
    return tiny_model(), *document_stream()


def rows_of(model, tokens, tables, adapt, ranks=1, geo=T.Geometry(SEQ, STRIDE, ROWS)):
    """{target: full log-probability row} of the real evaluation, and its result."""
    return captured_rows(lambda: T.evaluate(model, tokens, tables, SimulatedRanks(ranks), geo, adapt, want_nll=True))


def chunk_windows(tokens, geo=T.Geometry(SEQ, STRIDE, ROWS)):
    """(document start a, chunk c, window inputs, first target offset, end target offset) for every chunk of every
    document, straight from the rule: a document runs to the next BOS; chunk c's targets c*stride.. are predicted
    from at most seq_len of the document's own earlier tokens."""
    starts = [0] + [p for p in range(1, len(tokens) - 1) if tokens[p] == T.BOS_ID]
    ends = starts[1:] + [len(tokens) - 1]
    for a, b in zip(starts, ends):
        n = b - a
        for c in range(-(-n // geo.stride)):
            e = min(n, (c + 1) * geo.stride)
            s = max(0, e - geo.seq_len)
            yield a, c, tokens[a + s:a + e], c * geo.stride - s, e - s


@pytest.mark.parametrize("stream", ["random", "bos_first", "no_bos", "bos_last"])
def test_document_spans_cover_every_target_once_within_its_document(stream):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 50, (97,), generator=g)
    tokens[[10, 11, 30, 64]] = T.BOS_ID
    if stream == "bos_first":
        tokens[0] = T.BOS_ID
    elif stream == "no_bos":
        tokens[tokens == T.BOS_ID] = 7
    elif stream == "bos_last":
        tokens[-1] = T.BOS_ID
    spans = T.document_spans(tokens)
    targets = [t for a, b in spans.tolist() for t in range(a + 1, b + 1)]
    assert targets == list(range(1, len(tokens)))
    for a, b in spans.tolist():
        assert not (tokens[a + 1:b] == T.BOS_ID).any(), "a document's inputs hold a BOS after its first token"


def test_plain_document_mode_scores_each_chunk_from_its_own_document_only(setup):
    model, tokens, tables = setup
    rows, r = rows_of(model, tokens, tables, T.Adaptation("document"))
    assert sorted(rows) == list(range(1, N)) and r.tokens == N - 1
    checked = 0
    for a, c, x, f, e in chunk_windows(tokens):
        with torch.no_grad():
            ref = torch.log_softmax(model.head(model.hidden(x[None]))[0], -1)
        start = a + 1 + c * STRIDE - f          # the target of column 0: the window starts at a + c*stride - f
        for j in range(f, e):
            torch.testing.assert_close(rows[start + j], ref[j], rtol=1e-12, atol=1e-12)
            checked += 1
    assert checked == N - 1
    assert np.allclose(r.nll, [-float(rows[t][tokens[t]]) for t in range(1, N)], rtol=0, atol=1e-12), \
        "NLL_DUMP_PATH's values: one per target, in stream order"


def test_long_documents_keep_seq_len_of_context():
    """A document longer than EVAL_SEQ_LEN: every chunk's window is the seq_len tokens before its end."""
    model = tiny_model()
    tokens = torch.randint(3, 300, (90,), generator=torch.Generator().manual_seed(5))
    tokens[0] = T.BOS_ID
    tables = T.ByteTables(torch.ones(320, dtype=torch.long), torch.zeros(320, dtype=torch.bool), torch.arange(320) < 3)
    geo = T.Geometry(16, 4, 2)
    rows, _ = rows_of(model, tokens, tables, T.Adaptation("document"), geo=geo)
    for a, c, x, f, e in chunk_windows(tokens, geo):
        assert len(x) <= 16
        with torch.no_grad():
            ref = torch.log_softmax(model.head(model.hidden(x[None]))[0], -1)
        start = a + 1 + c * 4 - f
        for j in range(f, e):
            torch.testing.assert_close(rows[start + j], ref[j], rtol=1e-12, atol=1e-12)


LORA = T.Lora(rank=4, alpha=8.0, lr=0.02, weight_decay=0.5, beta2=0.99, batch=ROWS, carry=False)


def lora_reference(model, tokens, lora):
    """One document at a time: fresh adapters (one row), each chunk scored, then torch.optim.AdamW (betas (0, beta2),
    eps 1e-10) on the chunk's mean loss, except after the document's last chunk."""
    rows = {}
    for a, b in T.document_spans(tokens).tolist():
        ad = T.Adapters(model, lora, 1)
        opt = torch.optim.AdamW(ad.parameters(), lr=lora.lr, betas=(0.0, lora.beta2), eps=1e-10,
                                weight_decay=lora.weight_decay)
        n_chunks = -(-(b - a) // STRIDE)
        for a_, c, x, f, e in chunk_windows(tokens):
            if a_ != a:
                continue
            logits = model.head(model.hidden(x[None], ad), ad)[0]
            logp = torch.log_softmax(logits.detach(), -1)
            start = a + 1 + c * STRIDE - f
            rows.update({start + j: logp[j] for j in range(f, e)})
            if c < n_chunks - 1:
                y = tokens[a + 1 + c * STRIDE - f:a + 1 + c * STRIDE - f + len(x)]
                loss = F.cross_entropy(logits[f:e], y[f:e])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return rows


def test_lora_equals_one_document_at_a_time_with_torch_adamw(setup):
    model, tokens, tables = setup
    fast, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=LORA))
    slow = lora_reference(model, tokens, LORA)
    assert sorted(fast) == sorted(slow)
    for t in fast:
        torch.testing.assert_close(fast[t], slow[t], rtol=1e-9, atol=1e-10)
    plain, _ = rows_of(model, tokens, tables, T.Adaptation("document"))
    assert sum(not torch.allclose(fast[t], plain[t]) for t in fast) > 60, "LoRA must change the later chunks"
    assert all(p.requires_grad for p in model.parameters()), "the model leaves the evaluation as it came"


def test_carried_adapters_change_later_batches_only(setup):
    """LORA_CARRY: A goes on from one batch to the next (#1767): the first batch of documents scores as without it,
    later batches differently."""
    model, tokens, tables = setup
    off, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=LORA))
    on, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=T.Lora(**{**LORA.__dict__, "carry": True})))
    spans = T.document_spans(tokens)
    first = T.assign_documents(spans[:, 1] - spans[:, 0], 1, T.Geometry(SEQ, STRIDE, ROWS))[0][:ROWS]
    firsts = {t for a, b in spans[first].tolist() for t in range(a + 1, b + 1)}
    assert all(torch.equal(on[t], off[t]) for t in firsts)
    assert any(not torch.allclose(on[t], off[t]) for t in set(on) - firsts)


SLOT = T.Slot(steps=3, lr=0.05, lr_min=0.005, warm_start=0.0)


def test_slot_equals_one_chunk_at_a_time_with_torch_adam(setup):
    """SLOT per chunk: a delta and bias fitted on the chunk's window columns before the chunk (its document's
    already-scored tokens), then the chunk scored with them."""
    model, tokens, tables = setup
    fast, _ = rows_of(model, tokens, tables, T.Adaptation("document", slot=SLOT))
    checked = 0
    for a, c, x, f, e in chunk_windows(tokens):
        with torch.no_grad():
            h = model.hidden(x[None])[0]
        y = tokens[a + 1 + c * STRIDE - f:a + 1 + c * STRIDE - f + len(x)]
        delta = torch.zeros(1, h.size(-1), dtype=h.dtype, requires_grad=True)
        bias = torch.zeros(1, 320, dtype=h.dtype, requires_grad=True)
        if f > 0:
            opt = torch.optim.Adam([delta, bias], lr=SLOT.lr, betas=(0.9, 0.999), eps=1e-8)
            for k in range(SLOT.steps):
                for group in opt.param_groups:
                    group["lr"] = SLOT.lr_min + 0.5 * (SLOT.lr - SLOT.lr_min) * (1 + math.cos(math.pi * k / SLOT.steps))
                opt.zero_grad()
                F.cross_entropy(model.head(h[:f] + delta) + bias, y[:f]).backward()
                opt.step()
        with torch.no_grad():
            ref = torch.log_softmax(model.head(h + delta) + bias, -1)
        start = a + 1 + c * STRIDE - f
        for j in range(f, e):
            torch.testing.assert_close(fast[start + j], ref[j], rtol=1e-9, atol=1e-10)
            checked += 1
    assert checked == N - 1


PHASES = T.Phases(docs=4, count=2, lr=0.05, momentum=0.9, clip=1.0, tokens=48)


def test_phases_train_after_their_group_and_leave_the_model_unchanged(setup):
    """Two phases over the first 4 documents: group 0 scores as with no phase, later groups with the weights the
    phases trained; afterwards the model holds the artifact's weights again."""
    model, tokens, tables = setup
    before = [p.detach().clone() for p in model.parameters()]
    plain, _ = rows_of(model, tokens, tables, T.Adaptation("document"))
    phased, r = rows_of(model, tokens, tables, T.Adaptation("document", phases=PHASES))
    spans = T.document_spans(tokens)
    groups = T.document_groups(len(spans), PHASES)
    assert groups == [(0, 2), (2, 4), (4, len(spans))]
    in_group = lambda g: {t for a, b in spans[groups[g][0]:groups[g][1]].tolist() for t in range(a + 1, b + 1)}  # noqa
    for t in in_group(0):    # other batch-mates and widths than in the plain run: float64 rounding only
        torch.testing.assert_close(phased[t], plain[t], rtol=0, atol=1e-12)
    for g in (1, 2):
        assert all(not torch.allclose(phased[t], plain[t]) for t in in_group(g))
    assert r.ttt_seconds > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_phases_are_the_same_on_one_and_on_three_simulated_ranks(setup):
    """A phase step's gradient is the sum over all ranks' rows over the step's target count: the split does not
    matter (float64 sums in another order: ~1e-12)."""
    model, tokens, tables = setup
    one, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=LORA, phases=PHASES))
    three, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=LORA, phases=PHASES), ranks=3)
    for t in one:
        torch.testing.assert_close(three[t], one[t], rtol=1e-8, atol=1e-9)
    unphased, _ = rows_of(model, tokens, tables, T.Adaptation("document", lora=LORA))
    assert any(not torch.allclose(one[t], unphased[t]) for t in one), "the phases trained: the split was exercised"


def test_static_balance_assigns_every_document_once_longest_first():
    geo = T.Geometry(2048, 64, 64)
    lengths = np.random.default_rng(0).lognormal(6.3, 1.0, 5000).astype(np.int64) + 1
    parts = T.assign_documents(lengths, 8, geo)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(lengths)))
    loads = [sum(T.doc_cost(int(lengths[i]), geo) for i in p) for p in parts]
    biggest = max(T.doc_cost(int(n), geo) for n in lengths)
    assert max(loads) - min(loads) <= biggest                      # the greedy bound
    assert max(loads) / (sum(loads) / 8) < 1.01
    for p in parts:
        assert (np.diff(lengths[p]) <= 0).all(), "each rank walks its documents longest first"
    assert all((a == b).all() for a, b in zip(parts, T.assign_documents(lengths, 8, geo)))


def test_the_budget_cut_is_agreed_by_all_simulated_ranks(setup):
    """A deadline already past: the first round runs as configured (nothing measured yet), then both simulated ranks
    score with the agreed cut (gather_result checks that every rank's rounds used the same settings)."""
    model, tokens, tables = setup
    adapt = T.Adaptation("document", slot=T.Slot(steps=40, lr=0.05), deadline=time.perf_counter() - 1)
    rows, r = rows_of(model, tokens, tables, adapt, ranks=2)
    assert r.budget_cuts > 0 and r.slot_steps_min == 0 and 0 < r.slot_steps_mean < 40
    assert sorted(rows) == list(range(1, N)), "a cut never drops a target"


def test_document_settings_are_checked():
    with pytest.raises(T.RunError, match="EVAL_MODE"):
        T.config_from_env(dict(TINY_ENV, EVAL_MODE="docs"))
    with pytest.raises(T.RunError, match="use LORA_RANK"):
        T.config_from_env(dict(TINY_ENV, TTT_LORA_RANK="8"))
    cfg, _ = T.config_from_env(dict(TINY_ENV, EVAL_MODE="document", LORA_RANK="0", PHASE_COUNT="0"))
    adapt = T.Adaptation.from_config(cfg, None)
    assert adapt.lora is None and adapt.phases is None and adapt.ttt is None and adapt.slot is not None


class AotEagerRun(T.Run):
    """COMPILE=1 AUTOCAST=bf16 as a GPU run traces it (dynamo's guards, AOT autograd's backward, fullgraph: a graph
    break is an error), with the aot_eager backend: inductor's C++ code generation costs minutes per graph on a CPU
    and decides nothing about recompiles."""

    def compile(self, fn, fullgraph: bool = False):
        return torch.compile(fn, dynamic=False, fullgraph=True, backend="aot_eager")


def test_compiled_document_mode_never_recompiles_after_its_warmup(monkeypatch):
    """The warm-up (random tokens) compiles every width, the adapters' backward and the phase step; after it, a
    recompile is an error. LoRA, SLOT and a phase all run, over documents of every length bucket."""
    model = tiny_model(dtype=torch.float32)
    tokens = torch.randint(3, 320, (400,), generator=torch.Generator().manual_seed(1))
    tokens[[0, 3, 9, 40, 41, 90, 200, 260]] = T.BOS_ID
    tables = T.ByteTables(torch.ones(320, dtype=torch.long), torch.zeros(320, dtype=torch.bool), torch.arange(320) < 3)
    real, frozen = T.document_warmup, contextlib.ExitStack()

    def warmup_then_freeze(*args):
        out = real(*args)
        frozen.enter_context(torch._dynamo.config.patch(error_on_recompile=True))   # undone below, whatever happens
        return out
    monkeypatch.setattr(T, "document_warmup", warmup_then_freeze)
    torch._dynamo.reset()
    adapt = T.Adaptation("document", slot=T.Slot(steps=2), lora=T.Lora(rank=4, batch=4),
                         phases=T.Phases(docs=4, count=1, tokens=64))
    try:
        run = AotEagerRun(compiled=True, amp=torch.bfloat16)
        r = T.evaluate(model, tokens, tables, run, T.Geometry(32, 8, 4), adapt)
    finally:
        monkeypatch.setattr(T, "document_warmup", real)   # the eager reference below must not freeze anything
        frozen.close()
        torch._dynamo.reset()
    assert r.tokens == 399 and math.isfinite(r.loss)
    eager = T.evaluate(model, tokens, tables, T.Run(amp=torch.bfloat16), T.Geometry(32, 8, 4), adapt)
    assert abs(r.loss - eager.loss) < 1e-3 * eager.loss, (r.loss, eager.loss)


def test_the_document_mode_trims_slot_before_it_stops_the_lora():
    """Document mode: LoRA is one on/off knob worth more than a SLOT step (#1855), so SLOT steps go first; the stream
    mode keeps TTT epochs first."""
    budget = T.EvalBudget(deadline=time.perf_counter() + 6.2, steps=8, epochs=1, windows=1000, tokens=1000,
                          mode="document")
    for _ in range(3):
        budget.observe_batch(10, 0.01, 0.05, 8)
        budget.observe_chunk(0.01, 1, 10)
    assert budget.plan("test") == (7, 1)
    stream = T.EvalBudget(deadline=time.perf_counter() + 6.2, steps=8, epochs=1, windows=1000, tokens=1000)
    for _ in range(3):
        stream.observe_batch(10, 0.01, 0.05, 8)
        stream.observe_chunk(0.01, 1, 10)
    assert stream.plan("test") == (8, 0)

"""The causality harness for the document mode (../shared/docs/LEGAL_EVAL.md, "Document order"). The real evaluation
runs on a tiny float64 model; flipping token p may change only
  (a) the scores of its own document after p (its later chunks, after LoRA steps that saw p), and
  (b) scores made after an update that had already seen p: with phases, every group after p's group; with carried
      adapters, the later batches of the same rank, group and row.
With phases and carried adapters off, documents are independent: a flip in one changes no score in another. The order
is fixed before scoring starts and depends on the document boundaries (a document's length decides its batch), so a
flip that moves a boundary (a BOS appears or vanishes) re-batches the group: its rule is checked with carried
adapters off, where batching changes no value beyond float64 rounding (BOS_FLIP_ATOL).
The harness must bite: four leaky variants, kept here, must be caught."""
import numpy as np
import pytest
import torch

import train_gpt as T
from test_documents import LORA, PHASES, SLOT, ROWS, SEQ, STRIDE, document_stream, rows_of

GEO = T.Geometry(SEQ, STRIDE, ROWS)
BOS_FLIP_ATOL = 1e-12    # re-batched documents: other widths and batch-mates, the same value up to float64 rounding


@pytest.fixture(scope="module")
def stream():
    from helpers import tiny_model
    # DOC_ATTENTION off: the mode must keep documents apart by itself (an artifact may predate the mask; with it on,
    # the model alone would hide a mode that lets context cross a BOS)
    return tiny_model(doc_attention=0), *document_stream()


# The rules are stated on the real documents and groups, whatever a leaky variant swaps in for the evaluation.
SPANS, GROUPS, ASSIGN = T.document_spans, T.document_groups, T.assign_documents


def allowed(tokens: torch.Tensor, p: int, adapt: T.Adaptation, ranks: int) -> set[int]:
    """The targets a flip of token p may change, by rules (a) and (b)."""
    spans = SPANS(tokens)
    k = int(np.searchsorted(spans[:, 0], p, side="right") - 1)     # the document whose inputs hold p
    out = set(range(p + 1, int(spans[k, 1]) + 1))                    # (a): its own later targets
    groups = GROUPS(len(spans), adapt.phases)
    g = next(i for i, (g0, g1) in enumerate(groups) if g0 <= k < g1)
    g0, g1 = groups[g]
    if adapt.phases is not None and g < len(groups) - 1:             # (b): every group after p's phase
        out |= set(range(int(spans[g1 - 1, 1]) + 1, len(tokens)))
    if adapt.lora is not None and adapt.lora.carry:                  # (b): p's row in the rank's later batches
        for part in ASSIGN(spans[g0:g1, 1] - spans[g0:g1, 0], ranks, GEO):
            for i in np.nonzero(part == k - g0)[0].tolist():
                for j in range(i + ROWS, len(part), ROWS):
                    a, b = spans[g0 + int(part[j])]
                    out |= set(range(int(a) + 1, int(b) + 1))
    return out


def flips(tokens: torch.Tensor, boundaries: bool) -> list[tuple[int, int]]:
    """Ordinary tokens changed at document starts, ends and middles; with `boundaries`, also a BOS appearing and
    every BOS vanishing."""
    spans = T.document_spans(tokens)
    pos = sorted({int(q) for a, b in spans.tolist() for q in (a + 1, (a + b) // 2, b - 1) if 0 < q < len(tokens) - 1
                  and tokens[q] != T.BOS_ID})
    out = [(q, 3 + (int(tokens[q]) - 3 + 17) % 300) for q in pos[::2]]
    if boundaries:
        out += [(q, T.BOS_ID) for q in pos[1::5]]
        out += [(q, 5) for q in (tokens == T.BOS_ID).nonzero().flatten().tolist()[1::2]]
    return out


def violations(model, tokens, tables, adapt, ranks=1, boundaries=True):
    """(p, t): flipping p changed the score of t although neither rule allows it."""
    base, _ = rows_of(model, tokens, tables, adapt, ranks)
    bad, moved_elsewhere = [], 0
    for p, new in flips(tokens, boundaries):
        flipped = tokens.clone()
        flipped[p] = new
        rows, _ = rows_of(model, flipped, tables, adapt, ranks)
        ok = allowed(tokens, p, adapt, ranks) | allowed(flipped, p, adapt, ranks)
        moved = boundaries and (new == T.BOS_ID or tokens[p] == T.BOS_ID)
        for t in range(1, len(tokens)):
            same = (torch.allclose(rows[t], base[t], rtol=0, atol=BOS_FLIP_ATOL) if moved
                    else torch.equal(rows[t], base[t]))
            if not same and t not in ok:
                bad.append((p, t))
            own = allowed(tokens, p, T.Adaptation("document"), ranks)
            moved_elsewhere += (not same) and t not in own
    return bad, moved_elsewhere


INDEPENDENT = {
    "plain": T.Adaptation("document"),
    "slot": T.Adaptation("document", slot=SLOT),
    "lora": T.Adaptation("document", lora=LORA),
    "lora_slot_warm": T.Adaptation("document", slot=T.Slot(steps=3, lr=0.05, warm_start=0.9), lora=LORA),
}


@pytest.mark.parametrize("name", list(INDEPENDENT))
def test_documents_are_independent_without_phases_or_carried_adapters(stream, name):
    model, tokens, tables = stream
    bad, elsewhere = violations(model, tokens, tables, INDEPENDENT[name])
    assert bad == []
    assert elsewhere == 0


def test_the_frontier_model_keeps_documents_apart_too(stream):
    """The frontier line's model pieces (the loop of a segment, SparseAttnGate, SmearGate v2; every weight noisy, so no
    gate is an identity) under LoRA + SLOT: still no score of another document, nor an earlier one, moves. (A row holds
    one document here, so SmearGate v2's BOS mask is tests/test_frontier_model.py's to prove.)"""
    from helpers import tiny_model
    _, tokens, tables = stream
    model = tiny_model(doc_attention=0, recur_layers="", loop_layers="1,2", attn_gate=1, smear_gate="input")
    assert [p.layer for p in model.schedule] == [0, 1, 2, 1, 2, 1, 2]
    bad, elsewhere = violations(model, tokens, tables, INDEPENDENT["lora_slot_warm"])
    assert bad == []
    assert elsewhere == 0


CARRIED = {
    "carry": T.Adaptation("document", lora=T.Lora(**{**LORA.__dict__, "carry": True})),
    "phases": T.Adaptation("document", lora=LORA, phases=PHASES),
    "all": T.Adaptation("document", slot=SLOT, lora=T.Lora(**{**LORA.__dict__, "carry": True}), phases=PHASES),
}


@pytest.mark.parametrize("name, ranks", [("carry", 1), ("phases", 1), ("all", 2)])
def test_a_flip_reaches_only_scores_after_an_update_that_saw_it(stream, name, ranks):
    """Carried adapters and phases: a flip may reach other documents, but only through an update that had seen it;
    with carried adapters, boundary flips re-batch the group (see the module docstring) and are left out."""
    model, tokens, tables = stream
    adapt = CARRIED[name]
    bad, elsewhere = violations(model, tokens, tables, adapt, ranks, boundaries=not adapt.lora.carry)
    assert bad == []
    assert elsewhere > 0, "nothing crossed a document: the updates were not exercised"


# ---- the harness must bite ---------------------------------------------------------------------------------------

def leaky_next_chunk(scored, first, inside):
    """A LoRA step on the next chunk's targets, before that chunk is scored (illegal: train before scoring)."""
    width = scored.size(1)
    span = scored.sum(1, keepdim=True)
    col = torch.arange(width)[None, :]
    return (col >= first[:, None] + span) & (col < first[:, None] + 2 * span) & inside


def leaky_later_chunks(scored, first, inside):
    """A LoRA step on every later column of the document in the window (illegal: the adapters see later chunks)."""
    return (torch.arange(scored.size(1))[None, :] >= first[:, None]) & inside & scored.any(1, keepdim=True)


def leaky_phase(spans, g0, g1):
    """A phase that also trains on the next group's first documents, not yet scored (illegal)."""
    return spans[g0:g1 + 2]


def leaky_spans(tokens):
    """Documents that run on past the next BOS, into the next document (illegal context; and no independence)."""
    n = len(tokens)
    return np.asarray([[0, n - 1]], dtype=np.int64)


@pytest.mark.parametrize("target, leaky, adapt", [
    ("lora_columns", leaky_next_chunk, INDEPENDENT["lora"]),
    ("lora_columns", leaky_later_chunks, INDEPENDENT["lora"]),
    ("phase_documents", leaky_phase, CARRIED["phases"]),
    ("document_spans", leaky_spans, INDEPENDENT["plain"]),
])
def test_the_harness_catches_leaky_document_variants(stream, monkeypatch, target, leaky, adapt):
    model, tokens, tables = stream
    monkeypatch.setattr(T, target, leaky)
    bad, _ = violations(model, tokens, tables, adapt, boundaries=False)
    assert bad, f"the harness did not catch {leaky.__name__}"
    if target == "lora_columns":
        assert any(p == t for p, t in bad), "a target scored after a step on itself depends on itself"

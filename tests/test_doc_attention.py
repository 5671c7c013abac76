"""DOC_ATTENTION: attention never crosses a BOS. The mask against its definition, a document's outputs against the
same document alone, FlashAttention-3's cu_seqlens against a Python reference, and old artifacts (no such field)."""
import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model

BOS = T.BOS_ID


def _row(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens])


def _two_documents(seed: int = 0) -> tuple[torch.Tensor, int]:
    """One row of 32: the tail of a document (no BOS: the row starts mid-document), then document B from its BOS."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(3, 320, (1, 32), generator=g)
    idx[0, 12] = BOS
    return idx, 12


def test_the_sdpa_mask_is_same_document_and_causal():
    idx = torch.randint(3, 320, (3, 12))
    idx[0, [0, 4, 5, 6]] = BOS      # a BOS at 0 and a run of three (two one-token documents)
    idx[1, 7] = BOS                 # starts mid-document
    mask = T.document_mask(idx, "sdpa")
    assert mask.shape == (3, 1, 12, 12)
    for b in range(3):
        docs = [sum(int(idx[b, j]) == BOS for j in range(i + 1)) for i in range(12)]
        want = [[s <= t and docs[s] == docs[t] for s in range(12)] for t in range(12)]
        assert mask[b, 0].tolist() == want, b


def _reference_starts(idx: torch.Tensor) -> list[int]:
    B, T_ = idx.shape
    starts = [b * T_ + t for b in range(B) for t in range(T_) if t == 0 or int(idx[b, t]) == BOS]
    return starts + [B * T_] * (B + B * T_ // T.DOC_MIN_TOKENS + 1 - len(starts))


@pytest.mark.parametrize("compiled", [False, True])
def test_flash_attention_document_starts_match_a_python_reference(compiled, monkeypatch):
    """FA3's cu_seqlens over the flattened batch, padded to a static size with zero-length sequences: rows that start
    mid-document, a BOS at 0, a BOS run, a row without a BOS, and as many starts as the size holds."""
    monkeypatch.setattr(T, "DOC_MIN_TOKENS", 4)     # 5 rows of 9: room for 5 + 11 starts
    idx = torch.randint(3, 320, (5, 9))
    idx[0, 0] = BOS
    idx[1, [3, 4, 5]] = BOS
    idx[2, 8] = BOS
    idx[4, [1, 2, 3, 4, 5, 6]] = BOS    # row 3 has no BOS; 5 rows + 10 BOS after a row start: 15 starts
    fn = torch.compile(T.document_starts, fullgraph=True, dynamic=False) if compiled else T.document_starts
    cu = fn(idx)
    assert cu.dtype == torch.int32 and cu.tolist() == _reference_starts(idx)
    plain = torch.randint(3, 320, (5, 9))
    assert fn(plain).tolist() == _reference_starts(plain) and fn(plain).tolist()[:3] == [0, 9, 18]


def test_more_documents_than_flash_attention_holds_stop_the_run(monkeypatch):
    """Never merge two documents: one start more than the static size is an error, not a silent cross-document
    sequence."""
    monkeypatch.setattr(T, "DOC_MIN_TOKENS", 4)
    idx = torch.randint(3, 320, (5, 9))
    idx[4, 1:] = BOS                    # 5 rows + 8 BOS: 13 starts, the size holds 16
    T.document_starts(idx)
    idx[3, 1:4] = BOS                   # 16
    T.document_starts(idx)
    idx[3, 5] = BOS                     # 17
    with pytest.raises(RuntimeError, match="DOC_ATTENTION"):
        T.document_starts(idx)


def test_a_document_never_sees_the_one_before_it():
    """Any change to the tokens of the first document (before B's BOS) leaves every output of B unchanged; without
    DOC_ATTENTION the same change reaches B (so the test can fail)."""
    idx, b0 = _two_documents()
    other = idx.clone()
    other[0, :b0] = torch.randint(3, 320, (b0,), generator=torch.Generator().manual_seed(1))
    for doc_attention in (True, False):
        m = tiny_model(doc_attention=int(doc_attention))
        with torch.no_grad():
            gap = float((m.hidden(idx)[0, b0:] - m.hidden(other)[0, b0:]).abs().max())
        assert (gap == 0) if doc_attention else (gap > 1e-3), (doc_attention, gap)


def test_a_document_after_another_is_the_same_document_alone():
    """B's outputs in a row after document A equal B's outputs alone at the start of a row: BigramHash and SmearGate
    stop at the BOS, value embeddings and the value residual are per position, and RoPE is relative (float noise)."""
    idx, b0 = _two_documents()
    m = tiny_model(doc_attention=1)
    with torch.no_grad():
        together = m.hidden(idx)[0, b0:]
        alone = m.hidden(idx[:, b0:])[0]
    assert torch.allclose(together, alone, rtol=0, atol=1e-12), float((together - alone).abs().max())


def test_doc_attention_off_is_the_plain_causal_kernel(monkeypatch):
    """Off, SDPA gets is_causal and no mask (no cost); on, a mask and not is_causal."""
    seen = []
    real = T.F.scaled_dot_product_attention

    def recording(*a, **kw):
        seen.append((kw.get("attn_mask") is None, kw.get("is_causal")))
        return real(*a, **kw)
    monkeypatch.setattr(T.F, "scaled_dot_product_attention", recording)
    idx, _ = _two_documents()
    for doc_attention, want in ((0, (True, True)), (1, (False, False))):
        seen.clear()
        tiny_model(doc_attention=doc_attention).hidden(idx)
        assert seen and set(seen) == {want}, (doc_attention, seen)


def test_an_artifact_from_before_doc_attention_loads_with_it_off(tmp_path):
    """An artifact whose model fields predate DOC_ATTENTION was trained across documents: it reads back as False,
    whatever the default; one that names it keeps its value."""
    cfg, _ = T.config_from_env(TINY_ENV)
    model = T.GPT(cfg)
    state, labels = model.state_dict(), T.param_labels(model)
    for stored in (None, True, False):
        model_cfg = {f: getattr(cfg, f) for f in T.MODEL_FIELDS if f != "doc_attention"}
        if stored is not None:
            model_cfg["doc_attention"] = stored
        blob, _, _ = T.pack_artifact(T.pack_state(state, labels, model_cfg))
        path = tmp_path / f"{stored}.pgz"
        path.write_bytes(blob)
        read_cfg, _ = T.read_artifact(path)
        assert read_cfg["doc_attention"] is (stored is True), stored
        assert set(read_cfg) == set(T.MODEL_FIELDS)

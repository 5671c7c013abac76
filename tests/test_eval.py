"""Sliding windows: exact coverage, and the batched evaluation equals a slow per-target oracle."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt as T
from helpers import TINY_ENV, tiny_model


@pytest.mark.parametrize("n, seq_len, stride", [(2, 8, 4), (9, 8, 4), (10, 8, 8), (101, 16, 5), (1001, 64, 64),
                                                (1000, 64, 7), (37, 64, 16), (65, 64, 1), (66, 64, 64)])
def test_every_target_scored_exactly_once(n, seq_len, stride):
    w = T.build_windows(n, seq_len, stride)
    scored = np.concatenate([np.arange(f, e + 1) for s, e, f in w])
    assert np.array_equal(scored, np.arange(1, n)), "targets 1..N-1, each once, in stream order"
    width = min(seq_len, n - 1)
    assert np.all(w[:, 1] - w[:, 0] == width), "all windows full length (the last one is shifted, not shortened)"
    assert np.all(w[:, 0] >= 0) and np.all(w[:, 1] <= n - 1)
    assert np.all(w[:, 2] > w[:, 0]) and np.all(w[:, 2] <= w[:, 1])
    assert np.all(w[1:, 1] - w[1:, 2] + 1 <= stride), "later windows score at most one stride"
    # every scored target sees at least seq_len - stride tokens of context, or everything before it
    ctx = np.concatenate([np.arange(f, e + 1) - s for s, e, f in w])
    assert np.all(ctx >= np.minimum(seq_len - stride + 1, np.arange(1, n)))


def _model_and_tokens(n=203):
    cfg, _ = T.config_from_env(TINY_ENV)
    model = tiny_model()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(2, cfg.vocab_size, (n,), generator=g)
    tokens[::17] = T.BOS_ID
    base = torch.randint(0, 4, (cfg.vocab_size,), generator=g)
    tables = T.ByteTables(base, torch.rand(cfg.vocab_size, generator=g) < 0.5, torch.arange(cfg.vocab_size) < 3)
    return model, tokens, tables


def _oracle(model, tokens, tables, seq_len, stride):
    """One window at a time, full logits, then pick the scored targets: slow and obviously right."""
    nll, nbytes = [], 0
    for s, e, f in T.build_windows(len(tokens), seq_len, stride):
        x = tokens[s:e][None]
        logp = torch.log_softmax(model.head(model.hidden(x))[0], -1)
        for t in range(f, e + 1):
            nll.append(-float(logp[t - 1 - s, tokens[t]].detach()))
            nbytes += int(tables.count(tokens[t - 1:t], tokens[t:t + 1]))
    return np.array(nll), nbytes


@pytest.mark.parametrize("seq_len, stride, batch", [(32, 8, 5), (32, 32, 3), (16, 3, 64), (400, 8, 2)])
def test_evaluate_matches_the_oracle(seq_len, stride, batch):
    model, tokens, tables = _model_and_tokens()
    r = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(seq_len, stride, batch), want_nll=True)
    nll, nbytes = _oracle(model, tokens, tables, seq_len, stride)
    assert r.tokens == len(tokens) - 1 == len(r.nll) and r.bytes == nbytes
    np.testing.assert_allclose(r.nll, nll, rtol=1e-10, atol=1e-12)
    assert r.loss == pytest.approx(nll.mean(), rel=1e-12)
    assert r.bpb == pytest.approx(nll.sum() / np.log(2) / nbytes, rel=1e-12)


def test_single_window_equals_one_full_forward():
    model, tokens, tables = _model_and_tokens(n=50)
    r = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(64, 8, 4), want_nll=True)
    full = F.cross_entropy(model.head(model.hidden(tokens[None, :-1]))[0], tokens[1:], reduction="none")
    np.testing.assert_allclose(r.nll, full.detach().numpy(), rtol=1e-12)


def test_batch_size_does_not_change_any_score():
    model, tokens, tables = _model_and_tokens()
    a = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(32, 8, 1), want_nll=True).nll
    b = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(32, 8, 7), want_nll=True).nll
    np.testing.assert_allclose(a, b, rtol=1e-12)


def test_every_forward_has_the_same_shape():
    """A compiled forward (dynamic=False) would recompile, inside the eval budget, for a rank's short last batch."""
    model, tokens, tables = _model_and_tokens()
    shapes = []

    def recording_hidden(x):
        shapes.append(tuple(x.shape))
        return T.GPT.hidden(model, x)
    ref = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(32, 8, 7), want_nll=True).nll
    model.hidden = recording_hidden        # what evaluate's forward calls, on this instance only
    got = T.evaluate(model, tokens, tables, T.Run(), T.Geometry(32, 8, 7), want_nll=True).nll
    assert len(T.build_windows(len(tokens), 32, 8)) % 7 != 0 and set(shapes) == {(7, 32)}
    np.testing.assert_array_equal(got, ref)


def test_a_slice_without_bytes_is_an_error():
    model, tokens, tables = _model_and_tokens(n=40)
    nothing = T.ByteTables(torch.zeros_like(tables.base), torch.zeros_like(tables.space), tables.boundary)
    with pytest.raises(T.RunError, match="hold no text bytes"):
        T.evaluate(model, tokens, nothing, T.Run(), T.Geometry(16, 8, 4))

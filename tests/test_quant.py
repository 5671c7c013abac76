"""int6 / int8 quantization, the artifact format, and atomic writes."""
import os

import numpy as np
import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model


def _candidate_errors(w, qmax):
    """Squared error of every clip candidate, each row on its own: the oracle for the search."""
    amax = w.abs().amax(1)
    errs = []
    for frac in T.CLIP_FRACTIONS:
        scale = (amax * frac / qmax).half().float()[:, None]
        errs.append(((torch.clamp(torch.round(w / scale), -qmax, qmax) * scale - w) ** 2).sum(1))
    return torch.stack(errs)


def rtn(w, scale, qmax):
    return torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)


@pytest.mark.parametrize("qmax", [T.INT6_MAX, T.INT8_MAX])
def test_search_rule_takes_each_rows_best_clip(qmax):
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1)    # rows of very different scales
    scale = T.row_scales(w, qmax, 0.0)
    err = ((rtn(w, scale, qmax) * scale[:, None] - w) ** 2).sum(1)
    torch.testing.assert_close(err, _candidate_errors(w, qmax).min(0).values, rtol=1e-6, atol=0)
    assert float(err.sum() / (w ** 2).sum()) < (2e-3 if qmax == T.INT6_MAX else 1e-4)


def test_search_rule_clips_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 512))   # heavy tails: clipping the extremes pays off
    scale = T.row_scales(w, T.INT6_MAX, 0.0)
    clipped = scale < 0.999 * (w.abs().amax(1) / T.INT6_MAX)
    assert clipped.float().mean() > 0.5


def test_sd_rule_is_k_standard_deviations_and_its_grid_coarsens_with_k():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * torch.rand(32, 1)
    for k in (4.0, 12.85):
        scale = T.row_scales(w, T.INT6_MAX, k)
        torch.testing.assert_close(scale, (k * w.std(1, correction=0) / T.INT6_MAX).half().float())
    used = lambda k: len(torch.unique(rtn(w, T.row_scales(w, T.INT6_MAX, k), T.INT6_MAX)))
    assert used(12.85) < used(4.0) <= 2 * T.INT6_MAX + 1
    zero = T.row_scales(torch.zeros(2, 8), T.INT6_MAX, 12.85)   # an all-zero row still gets a usable scale
    assert torch.all(zero > 0) and torch.all(rtn(torch.zeros(2, 8), zero, T.INT6_MAX) == 0)


def gptq_reference(w, H, scale, qmax, damp):
    """GPTQ one column at a time (the OBQ form): round the column, spread its error onto every remaining column with
    the inverse Hessian, then remove the column from the inverse Hessian. No blocks, no Cholesky."""
    W, H = w.double().clone(), H.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * H.diagonal().mean() * torch.eye(len(H), dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    s = scale.double()
    left = list(torch.argsort(H.diagonal(), descending=True).tolist())
    while left:
        j = left.pop(0)
        Q[:, j] = torch.clamp(torch.round(W[:, j] / s), -qmax, qmax)
        err = (W[:, j] - Q[:, j] * s) / Hinv[j, j]
        for c in left:
            W[:, c] -= err * Hinv[j, c]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q


def random_layer(seed=0, rows=48, cols=200, n=600):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols) + 2 * mix).double()   # correlated inputs
    X[:, 7] = 0                                                       # a dead input column
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 0.05
    return w, X


def test_blocked_gptq_equals_the_column_by_column_reference():
    w, X = random_layer()
    H = X.T @ X
    scale = T.row_scales(w, T.INT6_MAX, 12.85).double()
    q = T.gptq(w, H, scale, T.INT6_MAX, damp=0.01, block=32)        # several blocks and a partial last one
    ref = gptq_reference(w, H, scale, T.INT6_MAX, damp=0.01)
    torch.testing.assert_close(q.double(), ref, rtol=0, atol=1e-5)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= T.INT6_MAX and torch.all(q[:, 7] == 0)


@pytest.mark.parametrize("clip_k", [12.85, 0.0])
def test_gptq_output_error_beats_round_to_nearest_on_held_out_inputs(clip_k):
    w, X = random_layer(seed=1, n=2000)
    fit, held = X[:1000], X[1000:]
    scale = T.row_scales(w, T.INT6_MAX, clip_k).double()
    err = lambda q: float(((held @ (w - q.double() * scale[:, None]).T) ** 2).sum())
    e_gptq = err(T.gptq(w, fit.T @ fit, scale, T.INT6_MAX, damp=0.01))
    e_rtn = err(rtn(w, scale, T.INT6_MAX))
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_byte_shuffle_round_trip():
    a = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float16)
    assert np.array_equal(T.unshuffle_bytes(T.shuffle_bytes(a), a.dtype.str, list(a.shape)), a)


def _model_state():
    cfg, _ = T.config_from_env(TINY_ENV)
    model = tiny_model(dtype=torch.float32, scale=0.1)
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    return cfg, model, state, T.param_labels(model)


def test_pack_unpack_follows_the_label_table():
    cfg, model, state, labels = _model_state()
    model_cfg = {f: getattr(cfg, f) for f in T.MODEL_FIELDS}
    got_cfg, got = T.unpack_state(T.pack_state(state, labels, model_cfg))
    assert got_cfg["num_layers"] == cfg.num_layers and set(got) == set(state)
    for name, t in state.items():
        kind = T.PARAM_TABLE[labels[name]][3]
        if kind == "fp32":
            assert torch.equal(got[name], t), name
        elif kind == "fp16":
            assert torch.equal(got[name], t.half().float()), name
        else:
            q, scale = T.quantize_tensor(t, kind, T.QuantSpec())
            assert torch.equal(got[name], q.float() * scale.float()[:, None]), name
            assert int(q.abs().max()) <= (T.INT6_MAX if kind == "int6" else 127), name
    model.load_state_dict(got)   # the names and shapes rebuild the model exactly


def test_artifact_round_trip_and_smallest_compressor(tmp_path):
    cfg, model, state, labels = _model_state()
    payload = T.pack_state(state, labels, {f: getattr(cfg, f) for f in T.MODEL_FIELDS})
    blob, name, sizes = T.pack_artifact(payload)
    assert set(sizes) == set(T.COMPRESSORS) and len(blob) == min(sizes.values()) == sizes[name]
    path = tmp_path / "a.pgz"
    T.write_atomic(path, blob)
    assert os.listdir(tmp_path) == ["a.pgz"]   # no temporary file left behind
    assert T.read_artifact(path)[0] == T.unpack_state(payload)[0]


def test_write_without_replace_keeps_both_files(tmp_path):
    path = tmp_path / "a.pgz"
    T.write_atomic(path, b"first", replace=False)
    assert os.listdir(tmp_path) == ["a.pgz"]
    with pytest.raises(T.RunError, match="appeared during the run and is kept"):
        T.write_atomic(path, b"second", replace=False)
    kept = [p for p in tmp_path.iterdir() if p.name != "a.pgz"]
    assert path.read_bytes() == b"first" and [p.read_bytes() for p in kept] == [b"second"]


def test_corrupt_artifacts_are_clear_errors(tmp_path):
    cfg, model, state, labels = _model_state()
    blob, _, _ = T.pack_artifact(T.pack_state(state, labels, {f: getattr(cfg, f) for f in T.MODEL_FIELDS}))
    bad = tmp_path / "bad.pgz"
    bad.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(T.RunError, match="bad.pgz: corrupt artifact"):
        T.read_artifact(bad)
    bad.write_bytes(b"PK\x03\x04 not ours")
    with pytest.raises(T.RunError, match="bad magic"):
        T.read_artifact(bad)
    with pytest.raises(T.RunError, match="file not found"):
        T.read_artifact(tmp_path / "missing.pgz")


def test_over_size_artifact_fails_and_is_kept(tmp_path, monkeypatch):
    cfg, model, state, labels = _model_state()
    monkeypatch.setattr(T, "ARTIFACT_LIMIT_BYTES", 1000)
    path = tmp_path / "big.pgz"
    with pytest.raises(T.RunError, match=r"exceeds the 1000-byte limit \(artifact kept at"):
        T.export_phase(cfg, T.Run(), state, labels, path)
    assert path.is_file() and path.stat().st_size > 0


def test_widen_trades_bits_for_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q1, s1 = T.quantize_tensor(w, "int6", T.QuantSpec(int6_clip_k=4.0))
    q2, s2 = T.quantize_tensor(w, "int6", T.QuantSpec(int6_clip_k=4.0), widen=2.0)
    torch.testing.assert_close(s2.float(), (s1.float() * 2).half().float())
    entropy = lambda q: float(-(lambda p: (p * p.log2()).sum())(torch.bincount(q.flatten() + 31).float().div(q.numel()).clamp_min(1e-12)))
    assert 0.8 < entropy(q1) - entropy(q2) < 1.2   # about log2(2) = 1 bit per weight saved
    assert ((q2.float() * s2.float()[:, None] - w) ** 2).mean() > ((q1.float() * s1.float()[:, None] - w) ** 2).mean()


def test_embedding_tables_use_the_int8_range_and_int6_matrices_the_int6_range():
    torch.manual_seed(0)
    w = torch.randn(64, 32)
    for kind, qmax in (("int8", 127), ("int6", 31)):
        q, _ = T.quantize_tensor(w, kind, T.QuantSpec(int6_clip_k=0.0, embed_clip_k=0.0))
        assert int(q.abs().max()) == qmax     # the search keeps at least one row at its abs-max


def test_export_fits_an_over_size_model_under_the_limit(tmp_path, monkeypatch):
    cfg, model, state, labels = _model_state()
    model_cfg = {f: getattr(cfg, f) for f in T.MODEL_FIELDS}
    natural, _, _ = T.pack_artifact(T.pack_state(state, labels, model_cfg))
    code = T.shipped_code_bytes(T.Path(T.__file__).read_text(encoding="utf-8"))   # what the export counts
    limit = code + int(len(natural) * 0.93)          # 7% too big at the natural scales
    monkeypatch.setattr(T, "ARTIFACT_LIMIT_BYTES", limit)
    lines = []
    monkeypatch.setattr(T, "log", lines.append)
    path = tmp_path / "fit.pgz"
    T.export_phase(cfg, T.Run(), state, labels, path)
    assert code + path.stat().st_size <= limit
    packs = [line for line in lines if line.startswith("export_pack")]
    assert packs[0].startswith("export_pack widen:1.0000") and len(packs) >= 2
    widen = float(next(line for line in lines if line.startswith("artifact:")).split("int6_scale_widen:")[1].split()[0])
    assert 1.0 < widen < 4.0
    _, got = T.read_artifact(path)
    model.load_state_dict(got)   # still a valid model


def test_missing_codec_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(T.CODEC_PACKAGES, 2, ("brotli", "no_such_package_here"))
    with pytest.raises(T.RunError, match="the brotli compressor needs the Python package no_such_package_here"):
        T.check_codec(2)
    T.check_codec(1)   # lzma is in the standard library

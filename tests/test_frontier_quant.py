"""The frontier's export pieces, each off by default: LQER, AWQ-lite, EMBED_BITS, MLP_CLIP_K, PACK_GROUPS, and the
artifact versions the reader accepts."""
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model

MODEL_CFG = {"num_layers": 1}


def _inputs(n: int, cols: int, seed: int, loud: slice | None = None) -> torch.Tensor:
    """Activations [n, cols]; the `loud` columns have 20x the RMS of the others (AWQ's salient channels)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    if loud is not None:
        x[:, loud] *= 20
    return x


def _output_error(w: torch.Tensor, got: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (w - got).T) ** 2).sum() / ((x @ w.T) ** 2).sum())


def _round_trip(state, labels, spec, hessians, tmp_path: Path, name: str = "a.pgz") -> dict[str, torch.Tensor]:
    """The state as the evaluation reads it: packed, compressed, written, read back."""
    blob, _, _ = T.pack_artifact(T.pack_state(state, labels, MODEL_CFG, spec, hessians))
    T.write_atomic(tmp_path / name, blob)
    return T.read_artifact(tmp_path / name)[1]


def test_lqer_lowers_the_output_error_and_the_artifact_adds_its_factors(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    w[:, :4] += torch.randn(64, 4) * 0.3            # outlier columns: the clip's error is nearly low-rank
    fit, held = _inputs(2000, 128, 1), _inputs(2000, 128, 2)
    state, labels, hess = {"m.weight": w}, {"m.weight": "matrix"}, {"m.weight": fit.T @ fit}
    base = T.QuantSpec(int6_clip_k=4.0)
    plain = _round_trip(state, labels, base, hess, tmp_path, "plain.pgz")["m.weight"]
    spec = T.QuantSpec(int6_clip_k=4.0, lqer_rank=4, lqer_top=1, lqer_group=64)
    got = _round_trip(state, labels, spec, hess, tmp_path)["m.weight"]
    assert _output_error(w, got, held) < 0.7 * _output_error(w, plain, held)
    f = T.lqer_factors(w - plain, 4, 64)          # the reference: codes x scales, B's scales by 64-value groups
    assert set(np.unique(f["lqer_a"])) <= {-2, -1, 0, 1} and f["lqer_b"].min() >= -8 and f["lqer_b"].max() <= 7
    a = torch.from_numpy(f["lqer_a"]).float() * float(f["lqer_a_scale"][0])
    b = (torch.from_numpy(f["lqer_b"]).float().view(-1, 64) * torch.from_numpy(f["lqer_b_scale"]).float()[:, None])
    torch.testing.assert_close(got, plain + a @ b.view(4, 128), rtol=0, atol=1e-6)


def test_lqer_takes_the_tensors_with_the_largest_error_norm():
    torch.manual_seed(0)
    state = {f"m{i}.weight": torch.randn(32, 64) * (i + 1) for i in range(4)}
    labels = dict.fromkeys(state, "matrix")
    payload = T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(lqer_rank=2, lqer_top=2, lqer_group=64))
    header = T.json.loads(payload[4:4 + int.from_bytes(payload[:4], "little")])
    assert sorted(header["notes"]) == ["m2.weight", "m3.weight"]   # ||W - Q|| grows with the weights' scale


def test_awq_lite_keeps_the_salient_group_on_a_finer_grid():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.02
    loud = slice(64, 128)
    fit, held = _inputs(4000, 256, 1, loud), _inputs(4000, 256, 2, loud)
    state, labels, hess = {"m.weight": w}, {"m.weight": "matrix"}, {"m.weight": fit.T @ fit}
    assert T.awq_choice(state, labels, hess, T.QuantSpec(awq_group=64)) == ("m.weight", 64)
    plain = T.unpack_state(T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(), hess))[1]["m.weight"]
    payload = T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(awq_group=64), hess)
    got = T.unpack_state(payload)[1]["m.weight"]
    assert _output_error(w, got, held) < 0.5 * _output_error(w, plain, held)
    header = T.json.loads(payload[4:4 + int.from_bytes(payload[:4], "little")])
    assert header["notes"] == {"m.weight": {"fine": [64, 128]}}
    q, s = T.quantize_tensor(w, "int6", T.QuantSpec(awq_group=64), hess["m.weight"], fine=(64, 128))
    want = q.float() * s.float()[:, None]
    want[:, loud] = q[:, loud].float() * T.fine_scale(s, T.INT6_MAX)[:, None]
    assert torch.equal(got, want) and int(q[:, loud].abs().max()) > T.INT6_MAX >= int(q[:, :64].abs().max())
    assert T.awq_choice(state, labels, hess, T.QuantSpec()) is None          # AWQ_GROUP=0: off


def test_embed_bits_7_stores_codes_within_63_and_round_trips(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(40, 16)
    spec = T.QuantSpec(embed_bits=7)
    q, scale = T.quantize_tensor(w, "int8", spec)
    assert int(q.abs().max()) == 63                 # the search keeps a row at its abs-max
    got = _round_trip({"e.weight": w}, {"e.weight": "embed"}, spec, None, tmp_path)["e.weight"]
    assert torch.equal(got, q.float() * scale.float()[:, None])
    assert T.config_from_env({"EMBED_BITS": "7"})[0].embed_bits == 7
    for bad in ("4", "9"):
        with pytest.raises(T.RunError, match="EMBED_BITS=.* must be 5..8"):
            T.config_from_env({"EMBED_BITS": bad})


def test_mlp_clip_k_changes_only_the_mlp_rows_scales():
    model = tiny_model(dtype=torch.float32, scale=0.1)
    state = {n: p.detach() for n, p in model.named_parameters()}
    labels = T.param_labels(model)
    base = T.unpack_state(T.pack_state(state, labels, MODEL_CFG, T.QuantSpec()))[1]
    mlp = T.unpack_state(T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(mlp_clip_k=11.5)))[1]
    changed = {n for n in state if not torch.equal(base[n], mlp[n])}
    assert changed == {n for n in state if ".mlp." in n and labels[n] == "matrix"}
    w = state["blocks.0.mlp.fc.weight"]
    _, s = T.quantize_tensor(w, "int6", T.QuantSpec(mlp_clip_k=11.5), name="blocks.0.mlp.fc.weight")
    torch.testing.assert_close(s, T.row_scales(w, T.INT6_MAX, 11.5).half())
    _, wide = T.quantize_tensor(w, "int6", T.QuantSpec(mlp_clip_k=11.5), widen=2.0, name="blocks.0.mlp.fc.weight")
    assert torch.equal(wide, (s.float() * 2).half())  # fit_to_limit's widen still scales the MLP grid


def test_late_qat_trains_each_matrix_on_its_own_clip_rule():
    """With MLP_CLIP_K set, late QAT's fake grid is the export's: the MLP's clip for the MLP, INT6_CLIP_K elsewhere."""
    cfg, _ = T.config_from_env(dict(TINY_ENV, MLP_CLIP_K="11.5", INT6_CLIP_K="7"))
    model = T.GPT(cfg)
    T.set_switches(model, cfg, (True, True))
    clips = {n: m.clip_k for n, m in model.named_modules() if isinstance(m, T.QLinear)}
    assert all(m.qat for m in model.modules() if isinstance(m, T.QLinear))
    assert {k for n, k in clips.items() if ".mlp." in n} == {11.5}
    assert {k for n, k in clips.items() if ".mlp." not in n} == {7.0}


def test_pack_groups_round_trips_bit_exactly_with_another_layout():
    model = tiny_model(dtype=torch.float32, scale=0.1)
    state = {n: p.detach() for n, p in model.named_parameters()}
    labels = T.param_labels(model)
    plain = T.pack_state(state, labels, MODEL_CFG, T.QuantSpec())
    grouped = T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(pack_groups=True))
    a, b = T.unpack_state(plain)[1], T.unpack_state(grouped)[1]
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert plain[4:] != grouped[4:]
    header = T.json.loads(grouped[4:4 + int.from_bytes(grouped[:4], "little")])
    roles = [(e["name"], e["role"]) for e in header["tensors"]]
    codes = [n for n, r in roles if r == "q"]
    assert [r for _, r in roles[:len(codes)]] == ["q"] * len(codes)     # the codes first, role by role
    assert codes[:3] == ["blocks.0.attn.c_k.weight", "blocks.1.attn.c_k.weight", "blocks.2.attn.c_k.weight"]
    assert {n for n, r in roles if r == "perm"} == {n for n in codes if n.endswith(T.PACK_SORTED)}
    assert all(header["notes"][n]["transposed"] for n in codes)


def test_fit_to_limit_sorts_the_rows_once_and_reads_back_at_every_widen(monkeypatch, tmp_path):
    """PACK_GROUPS' row sort is quadratic in rows (~20 s for the sp8192 table): fit_to_limit's wider passes reuse the
    first pass's orders (any stored order reads back), and the widened artifact still reads back bit-exactly."""
    model = tiny_model(dtype=torch.float32, scale=0.1)
    state = {n: p.detach() for n, p in model.named_parameters()}
    labels, spec = T.param_labels(model), T.QuantSpec(pack_groups=True)
    calls, sort = [], T.nn_order
    monkeypatch.setattr(T, "nn_order", lambda codes: calls.append(1) or sort(codes))
    monkeypatch.setattr(T, "log", lambda *a, **k: None)
    one = len(T.pack_artifact(T.pack_state(state, labels, MODEL_CFG, spec))[0])
    sorted_once = len(calls)
    blob, _, _, widen = T.fit_to_limit(state, labels, MODEL_CFG, one - 2000, spec)
    assert widen > 1 and len(calls) == 2 * sorted_once, "each matrix sorted once by fit_to_limit, however many passes"
    T.write_atomic(tmp_path / "a.pgz", blob)
    got = T.read_artifact(tmp_path / "a.pgz")[1]
    want = T.unpack_state(T.pack_state(state, labels, MODEL_CFG, T.QuantSpec(), widen=widen))[1]
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_the_attention_gate_is_int8_per_row_whatever_the_embedding_rules():
    """ATTN_GATE's W keeps 127 levels a side and the clip search under EMBED_BITS=7 and EMBED_CLIP_K=20 (#1736)."""
    torch.manual_seed(0)
    w = torch.randn(8, 12) * 0.1
    spec = T.QuantSpec(embed_bits=7, embed_clip_k=20)
    q, scale = T.quantize_tensor(w, "int8", spec, name="blocks.3.attn.gate")
    assert int(q.abs().max()) > 63
    torch.testing.assert_close(scale, T.row_scales(w, T.INT8_MAX, 0.0).half())
    assert _output_error(w, q.float() * scale.float()[:, None], torch.eye(12)) < 1e-4
    table, _ = T.quantize_tensor(w, "int8", spec, name="tok_emb.weight")   # the embedding keeps its own rules
    assert int(table.abs().max()) <= 63


def test_nn_order_is_a_permutation_that_shortens_the_path():
    x = np.random.default_rng(0).integers(-31, 32, size=(50, 20)).astype(np.int8)
    order = T.nn_order(x)
    path = lambda rows: int(np.abs(np.diff(rows.astype(np.int32), axis=0)).sum())
    assert sorted(order.tolist()) == list(range(50)) and order[0] == 0
    assert path(x[order]) < 0.9 * path(x)


def test_an_artifact_of_the_previous_format_still_loads(tmp_path):
    # tests/data/artifact_v2.bin: written by train_gpt.py at commit 6e09240 (PGOLF-2) from this seeded state
    torch.manual_seed(0)
    state = {"m.weight": torch.randn(8, 16), "e.weight": torch.randn(12, 8), "s": torch.randn(8),
             "r": torch.randn(1, 8)}
    path = Path(__file__).parent / "data" / "artifact_v2.bin"
    assert path.read_bytes().startswith(b"PGOLF-2\n")
    model_cfg, got = T.read_artifact(path)
    assert model_cfg["recur_layers"] == (1,) and model_cfg["doc_attention"] is False
    assert torch.equal(got["r"], state["r"]) and torch.equal(got["s"], state["s"].half().float())
    for name, kind in (("m.weight", "int6"), ("e.weight", "int8")):   # the defaults round as version 2 did
        q, scale = T.quantize_tensor(state[name], kind, T.QuantSpec())
        assert torch.equal(got[name], q.float() * scale.float()[:, None]), name
    old = tmp_path / "v1.pgz"
    old.write_bytes(b"PGOLF-1\n" + path.read_bytes()[8:])
    with pytest.raises(T.RunError, match=r"v1\.pgz: artifact format b'PGOLF-1' is not one this script reads"):
        T.read_artifact(old)


def test_lqer_settings_are_checked():
    with pytest.raises(T.RunError, match="LQER_TOP and LQER_GROUP must be > 0"):
        T.config_from_env({"LQER_RANK": "4", "LQER_TOP": "0"})
    spec = T.QuantSpec.from_config(T.config_from_env(dict(TINY_ENV, LQER_RANK="4", AWQ_GROUP="64"))[0])
    assert (spec.lqer_rank, spec.lqer_top, spec.lqer_group, spec.awq_group, spec.pack_groups) == (4, 3, 64, 64, False)

"""Model structure, causality, document isolation, parameter labels and optimizers."""
import copy

import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model

BOS = T.BOS_ID


def tiny(**over):
    env = dict(TINY_ENV, **{k.upper(): str(v) for k, v in over.items()})
    cfg, _ = T.config_from_env(env)
    return cfg


def test_schedule_runs_layers_4_and_5_twice():
    order = T.layer_schedule(T.config_from_env({"RECUR_LAYERS": "4,5"})[0])
    assert [p.layer for p in order] == [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10]
    assert [p.repeat for p in order if p.repeat >= 0] == [0, 1]
    assert T.layer_schedule(T.Config()) == order   # the default (PR #1278's shape)
    plain = T.layer_schedule(T.config_from_env({"RECUR_LAYERS": "", "PARALLEL_START": "0"})[0])
    assert [(p.layer, p.repeat) for p in plain] == [(i, -1) for i in range(11)]
    assert [p.ve for p in plain] == [-1] * 9 + [0, 1] and not any(p.parallel for p in plain)
    par = T.layer_schedule(T.config_from_env({"PARALLEL_START": "7", "RECUR_LAYERS": ""})[0])
    assert [p.parallel for p in par] == [False] * 7 + [True] * 4


def test_default_model_shape():
    m = T.GPT(T.config_from_env({"RECUR_LAYERS": "4,5"})[0])
    assert len(m.schedule) == 13 and m.skip_weights.shape == (6, 512)
    assert m.iter_embed.shape == m.iter_gate.shape == (2, 512)
    assert torch.all(m.iter_gate == -2.0)
    plain = T.GPT(T.config_from_env({"RECUR_LAYERS": ""})[0])
    assert len(plain.schedule) == 11 and plain.iter_embed is None and plain.skip_weights.shape == (5, 512)
    assert plain.value_embed.embed.shape == (1024, 128) and plain.value_embed.proj.weight.shape == (256, 128)
    # the recurrence adds only the per-pass conditioning: 2 x 2 x 512 parameters (the skip count is min(6, 7) = 6 vs 5)
    n = lambda mod: sum(p.numel() for p in mod.parameters())
    assert n(m) - n(plain) == 2 * 2 * 512 + 512


def test_recurrence_off_is_the_plain_model_and_leaves_the_conditioning_untouched():
    """Before RECUR_START_FRAC the recurrent model runs the plain model's 11 passes and U-Net (same function, given the
    plain model's weights); iter_embed / iter_gate get no gradient, the optimizer step reduces that as zeros, and
    Adam with zero gradients from the start (no weight decay on them) leaves them where they are."""
    m = tiny_model(recur_layers="1", ve_layers="-1", dtype=torch.float32)
    plain = tiny_model(recur_layers="", ve_layers="-1", dtype=torch.float32)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            src = dict(m.named_parameters())[name]
            p.copy_(src[:p.size(0)] if name == "skip_weights" else src)
    x = torch.randint(2, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    m.recur_on = False
    torch.testing.assert_close(m(x, x), plain(x, x), rtol=0, atol=0)
    cfg, _ = T.config_from_env(TINY_ENV)
    opts = T.build_optimizers(m, cfg, T.Run())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m(x, x).backward()
    assert m.iter_embed.grad is None and m.iter_gate.grad is None
    T.optimizer_step(opts, T.Run(), 0.3)
    after = dict(m.named_parameters())
    assert torch.equal(after["iter_embed"], before["iter_embed"]) and torch.equal(after["iter_gate"], before["iter_gate"])
    assert not torch.equal(after["blocks.0.attn.c_q.weight"], before["blocks.0.attn.c_q.weight"]), "the others trained"
    m.recur_on = True
    assert not torch.equal(m(x, x), plain(x, x))


def test_causal_in_float64():
    m = tiny_model(seed=1)
    x = torch.randint(2, 320, (2, 40))
    base = torch.log_softmax(m.head(m.hidden(x)), -1)
    for p in (0, 7, 39):
        y = x.clone()
        y[:, p] = (y[:, p] + 5) % 320
        out = torch.log_softmax(m.head(m.hidden(y)), -1)
        assert torch.equal(out[:, :p], base[:, :p]), f"position {p} changed earlier outputs"
        assert not torch.equal(out[:, p:], base[:, p:])


def test_smear_and_bigram_stop_at_bos():
    m = tiny_model(seed=1)
    x = torch.randint(3, 320, (2, 24))
    x[:, 0] = BOS
    x[:, 10] = BOS                # document 2 starts at 10
    base = m.embed(x)
    y = x.clone()
    y[:, 1:10] = torch.randint(3, 320, (2, 9))   # rewrite document 1 entirely
    out = m.embed(y)
    assert torch.equal(out[:, 10:], base[:, 10:]), "document 1 leaked into document 2 before attention"
    assert not torch.equal(out[:, 1:10], base[:, 1:10])
    # and the mixers really mix inside a document (otherwise the test above proves nothing)
    z = x.clone()
    z[:, 12] = (z[:, 12] + 1) % 320
    assert not torch.equal(m.embed(z)[:, 13], base[:, 13])


def test_every_parameter_labelled_and_claimed_once():
    cfg = T.config_from_env({"RECUR_LAYERS": "4,5", "ATTN_GATE": "1"})[0]   # every label in use
    m = T.GPT(cfg)
    labels = T.param_labels(m)
    assert set(labels.values()) == set(T.PARAM_TABLE)
    assert labels["tok_emb.weight"] == "embed" and labels["iter_gate"] == "recur"
    assert labels["blocks.0.attn.gate"] == "attn_gate"
    assert labels["value_embed.embed"] == "value_embed" and labels["bigram.embed"] == "bigram"
    assert labels["bigram.proj.weight"] == labels["value_embed.proj.weight"] == "matrix"   # Muon, as PR #1278
    assert all(labels[n] == "matrix" for n in labels if n.startswith("blocks.") and n.endswith(("c_q.weight", "fc.weight")))
    opts = T.build_optimizers(m, cfg, T.Run())
    claimed = [p for o in opts for g in o.param_groups for p in g["params"]]
    assert len(claimed) == len({id(p) for p in claimed}) == len(list(m.parameters()))
    unlabelled = copy.deepcopy(m)
    unlabelled.extra = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(AssertionError, match="without a label"):
        T.param_labels(unlabelled)


def test_recurrence_conditioning_is_fp32_and_not_decayed():
    m = T.GPT(T.Config())
    opts = T.build_optimizers(m, T.Config(), T.Run())
    for o in opts:
        for g in o.param_groups:
            if g["label"] == "recur":
                assert g["weight_decay"] == 0.0 and all(p.dtype == torch.float32 for p in g["params"])
                assert {id(p) for p in g["params"]} == {id(m.iter_embed), id(m.iter_gate)}
    assert T.PARAM_TABLE["recur"][3] == "fp32"


def test_newton_schulz_orthogonalises():
    g = torch.randn(64, 192)
    s = torch.linalg.svdvals(T.newton_schulz(g))
    assert s.min() > 0.5 and s.max() < 1.3   # the quintic iteration lands near 1, not exactly on it


def test_muon_with_a_zero_gradient_only_decays():
    p = torch.nn.Parameter(torch.randn(16, 32))
    p.label = "matrix"
    before = p.detach().clone()
    opt = T.Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5, run=T.Run())
    p.grad = torch.zeros_like(p)
    opt.step()   # zero gradient: only the decoupled decay acts
    assert torch.allclose(p.detach(), before * (1 - 0.1 * 0.5))


def test_lr_schedule():
    assert T.lr_scale(0.0, 0.5) == 1.0 and T.lr_scale(0.49, 0.5) == 1.0
    assert T.lr_scale(0.75, 0.5) == pytest.approx(0.5) and T.lr_scale(1.0, 0.5) == 0.0


def test_ema_ramps_then_follows_decay():
    """The EMA's decay is min(decay, (1+t)/(10+t)) at update t: exact values for a weight that jumps and then
    stays, over the ramp and after it; copy_to_model puts the average into the model."""
    m = torch.nn.Linear(1, 1, bias=False).double()
    ema = T.EMA(m, decay=0.8)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema.shadow = [torch.zeros_like(s) for s in ema.shadow]
    expect = 0.0
    for t in range(1, 40):
        with torch.no_grad():
            m.weight.fill_(1.0)
        ema.update()
        d = min(0.8, (1 + t) / (10 + t))
        expect = d * expect + (1 - d)
        assert float(ema.state_dict(m)["weight"]) == pytest.approx(expect, rel=1e-6), t   # the shadow is float32
    assert min(0.8, (1 + 39) / (10 + 39)) == 0.8, "the last updates ran at the full decay"
    ema.copy_to_model()
    assert float(m.weight) == pytest.approx(expect, rel=1e-6)


def test_attention_inputs_share_the_compute_dtype(monkeypatch):
    """From torch 2.12, CUDA autocast returns fp32 from rms_norm. q and k must still reach the attention kernel in
    the values' dtype, or FlashAttention-3 is silently skipped. Simulate that autocast rule on a bf16 model."""
    real_norm = T.rms_norm
    monkeypatch.setattr(T, "rms_norm", lambda x: real_norm(x).float())
    seen = []
    real_attention = T.causal_attention

    def recording(q, k, v, backend, mask=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_attention(q, k, v, backend, mask)
    monkeypatch.setattr(T, "causal_attention", recording)
    m = tiny_model(dtype=torch.float32)   # fp32 weights under bf16 autocast, as on the GPU
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.hidden(torch.randint(3, 320, (1, 16)))
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen


def test_cpu_never_picks_flash_attention():
    cfg, _ = T.config_from_env(TINY_ENV)
    assert T.flash_attention_problem(cfg, torch.device("cpu")) == "not a Hopper GPU"
    assert T.build_model(cfg, T.Run()).blocks[0].attn.backend == "sdpa"

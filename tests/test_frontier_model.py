"""The frontier's model pieces, each off by default: the segment loop (LOOP_LAYERS, #1344 / #1855), SparseAttnGate
(ATTN_GATE, #1787 / #1855) and SmearGate v2 (SMEAR_GATE=input, #1667 with #1855's BOS fix)."""
import dataclasses
import json

import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV, tiny_model

BOS = T.BOS_ID
ALL_ON = dict(recur_layers="0", loop_layers="1,2", attn_gate=1, smear_gate="input")   # the 3 tiny layers, all used
RECORD_LOOP = dict(num_layers=11, recur_layers="", loop_layers="3,4,5")               # #1855's 17 passes, tiny width


def config(**over) -> T.Config:
    return T.config_from_env(dict(TINY_ENV, **{k.upper(): str(v) for k, v in over.items()}))[0]


def two_documents(seed: int = 0) -> torch.Tensor:
    x = torch.randint(3, 320, (2, 24), generator=torch.Generator().manual_seed(seed))
    x[:, 0] = BOS
    x[:, 10] = BOS                # document 2 starts at 10
    return x


def test_the_loop_runs_the_records_17_passes_and_11_before_the_switch():
    m = tiny_model(**RECORD_LOOP)
    order = []
    for i, block in enumerate(m.blocks):
        block.register_forward_hook(lambda mod, args, out, i=i: order.append(i))
    x = two_documents()
    m.recur_on = False
    m.hidden(x)
    assert order == list(range(11))
    order.clear()
    m.recur_on = True
    m.hidden(x)
    assert order == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    # #1855's U-Net split of the 17 passes: 8 encoder passes, 9 decoder passes, 8 skips
    assert len(m.first_passes) == 11 and m.skip_weights.shape[0] == 8
    assert [p.ln for p in m.schedule[6:9]] == [p.ln for p in m.schedule[3:6]], "LN scale by physical layer"


def test_each_extra_pass_of_the_loop_has_its_own_iter_embed_row():
    m = tiny_model(**RECORD_LOOP)
    extra = [p.repeat for p in m.schedule if p.repeat >= 0]
    assert sorted(extra) == list(range(6)) and m.iter_embed.shape[0] == m.iter_gate.shape[0] == 6
    x = two_documents()
    m.head(m.hidden(x)).square().sum().backward()
    assert all(float(g.abs().sum()) > 0 for g in m.iter_embed.grad), "every row conditions a pass"
    # with RECUR_LAYERS beside the loop, its rows come first, as in an artifact from before the loop
    both = T.layer_schedule(config(num_layers=11, recur_layers="8", loop_layers="3,4,5", loop_passes=2))
    assert [(p.layer, p.repeat) for p in both if p.repeat >= 0] == [(3, 1), (4, 2), (5, 3), (8, 0)]


def test_loop_settings_are_checked():
    for env, msg in (({"LOOP_LAYERS": "1,2"}, "share layer"), ({"RECUR_LAYERS": "", "LOOP_LAYERS": "0,2"}, "consec"),
                     ({"RECUR_LAYERS": "", "LOOP_LAYERS": "2,3"}, "consec"),
                     ({"RECUR_LAYERS": "", "LOOP_LAYERS": "1", "LOOP_PASSES": "1"}, "LOOP_PASSES"),
                     ({"SMEAR_GATE": "scalar"}, "SMEAR_GATE"), ({"ATTN_GATE": "1", "GATE_DIMS": "33"}, "GATE_DIMS"),
                     ({"NUM_LOOPS": "2"}, "LOOP_PASSES"), ({"LOOP_START": "3"}, "LOOP_LAYERS"),
                     ({"SMEAR_GATE_ENABLED": "1"}, "SMEAR_GATE=input")):
        with pytest.raises(T.RunError, match=msg):
            T.config_from_env(dict(TINY_ENV, **env))
    assert T.warmup_plan(config(recur_layers="", loop_layers="1,2"))[0][1] == (False, False), "the loop waits"


def test_the_document_adapters_cover_every_pass_of_the_loop():
    m = tiny_model(**RECORD_LOOP)
    x = two_documents()
    ad = T.Adapters(m, T.Lora(rank=2), rows=2)
    assert len(ad.A) == 17 * len(T.Adapters.KINDS) + 1
    torch.testing.assert_close(m.hidden(x, ad), m.hidden(x), rtol=0, atol=0)   # B starts at zero
    m.head(m.hidden(x, ad), ad).square().sum().backward()
    assert all(float(ad.B[5 * i].grad.abs().sum()) > 0 for i in range(17)), "each pass reads its own adapters"


def initial(model, names, **over):
    """model with the parameters `names` as a freshly built GPT holds them (tiny_model adds noise to every weight)."""
    fresh = T.GPT(config(**over)).to(torch.float64).state_dict()
    model.load_state_dict({n: fresh[n] for n in names}, strict=False)
    return model


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_attention_gate_starts_as_the_identity_in_value_and_gradient():
    off = tiny_model()
    on = tiny_model(attn_gate=1)
    missing, _ = on.load_state_dict(off.state_dict(), strict=False)
    assert missing and all(n.endswith("attn.gate") for n in missing)
    initial(on, missing, attn_gate=1)
    x = two_documents()
    (loss_on, g_on), (loss_off, g_off) = loss_and_grads(on, x), loss_and_grads(off, x)
    assert loss_on == loss_off
    for name, g in g_off.items():
        torch.testing.assert_close(g_on[name], g, rtol=0, atol=0, msg=name)
    assert all(float(g_on[n].abs().sum()) > 0 for n in missing), "the gate itself learns"


def test_smear_gate_v2_starts_as_the_identity_in_value_and_gradient():
    m = initial(tiny_model(smear_gate="input"), ["smear.weight", "smear.lam"], smear_gate="input")
    x = two_documents()
    loss, grads = loss_and_grads(m, x)
    m.smear.forward = lambda x, idx: x          # no smear at all
    loss_plain, grads_plain = loss_and_grads(m, x)
    assert loss == loss_plain
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)
    assert float(grads["smear.lam"].abs()) > 0, "lambda learns first, then W"


def log_probs(model, x):
    return torch.log_softmax(model.head(model.hidden(x)), -1)


def test_the_gates_never_see_the_previous_document():
    m = tiny_model(**ALL_ON)
    assert m.doc_attention and float(m.smear.lam.detach().abs()) > 0
    assert float(m.blocks[1].attn.gate.detach().abs().min()) > 0, "the gates are open (tiny_model's noise)"
    x = two_documents()
    y = x.clone()
    y[:, 1:10] = torch.randint(3, 320, (2, 9), generator=torch.Generator().manual_seed(5))
    assert torch.equal(m.embed(y)[:, 10:], m.embed(x)[:, 10:]), "SMEAR_GATE=input reached document 2"
    assert torch.equal(log_probs(m, y)[:, 10:], log_probs(m, x)[:, 10:]), "document 1 reached document 2"
    z = x.clone()
    z[:, 12] = (z[:, 12] + 1) % 320
    assert not torch.equal(m.embed(z)[:, 13], m.embed(x)[:, 13]), "the smear mixes inside a document"


def test_the_gates_are_causal():
    m = tiny_model(**ALL_ON)
    x = two_documents(seed=1)
    x[:, 10] = 7                  # one document
    base = log_probs(m, x)
    for p in (3, 12, 23):
        y = x.clone()
        y[:, p] = (y[:, p] + 5) % 320
        out = log_probs(m, y)
        assert torch.equal(out[:, :p], base[:, :p]), f"position {p} changed earlier outputs"
        assert not torch.equal(out[:, p:], base[:, p:])


def test_the_artifact_keeps_every_piece_and_an_old_one_loads_them_off(tmp_path):
    cfg = config(**ALL_ON, attn_gate_scale=0.25, gate_dims=5, loop_passes=4)
    torch.manual_seed(0)
    m = T.GPT(cfg)
    with torch.no_grad():
        for b in m.blocks:
            b.attn.gate.normal_()
    state, labels = m.state_dict(), T.param_labels(m)
    model_cfg = {f: getattr(cfg, f) for f in T.MODEL_FIELDS}
    payload = T.pack_state(state, labels, model_cfg)
    storage = json.loads(payload[4:4 + int.from_bytes(payload[:4], "little")])["storage"]
    assert storage["blocks.0.attn.gate"] == "int8" and storage["smear.lam"] == "fp16"
    (tmp_path / "new.pgz").write_bytes(T.pack_artifact(payload)[0])
    read_cfg, read_state = T.read_artifact(tmp_path / "new.pgz")
    assert read_cfg == model_cfg and read_cfg["loop_layers"] == (1, 2)
    back = T.GPT(dataclasses.replace(cfg, **read_cfg))
    back.load_state_dict(read_state, strict=True)
    gate = state["blocks.0.attn.gate"]
    assert float((read_state["blocks.0.attn.gate"] - gate).norm() / gate.norm()) < 0.02, "int8 per row, not zeros"
    # an artifact written before these fields: the plain model of its day
    old_cfg = config()
    old = T.GPT(old_cfg)
    new_fields = ("loop_layers", "loop_passes", "attn_gate", "attn_gate_scale", "gate_dims", "smear_gate")
    old_fields = {f: getattr(old_cfg, f) for f in T.MODEL_FIELDS if f not in new_fields}
    blob = T.pack_artifact(T.pack_state(old.state_dict(), T.param_labels(old), old_fields))[0]
    (tmp_path / "old.pgz").write_bytes(blob)
    read_cfg, read_state = T.read_artifact(tmp_path / "old.pgz")
    assert set(read_cfg) == set(T.MODEL_FIELDS)
    assert (read_cfg["loop_layers"], read_cfg["attn_gate"], read_cfg["smear_gate"]) == ((), False, "vector")
    T.GPT(dataclasses.replace(cfg, **read_cfg)).load_state_dict(read_state, strict=True)


class AotEagerRun(T.Run):
    """COMPILE=1 AUTOCAST=bf16 traced as on a GPU (fullgraph: a graph break is an error), with the aot_eager
    backend: inductor's code generation costs minutes on a CPU and decides nothing about recompiles."""

    def compile(self, fn, fullgraph: bool = False):
        return torch.compile(fn, dynamic=False, fullgraph=True, backend="aot_eager")


def test_compiled_training_with_every_piece_on_never_recompiles_after_its_warmup():
    cfg = config(**ALL_ON, late_qat_frac=0)   # QAT's graphs are tests/test_compiled.py's; the loop's switch stays
    run = AotEagerRun(compiled=True, amp=torch.bfloat16)
    torch.manual_seed(0)
    model = T.GPT(cfg)
    opts = T.build_optimizers(model, cfg, run)
    x = two_documents()
    batches = [(x[:, :-1], x[:, 1:])]
    states = [state for _, state in T.warmup_plan(cfg)]
    assert states == [(False, False), (True, False)]
    torch._dynamo.reset()
    try:
        fwd = T.training_forward(model, run)
        for state in states:
            T.set_switches(model, cfg, state)
            T.train_step(fwd, opts, batches, run, cfg.grad_clip_norm)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for state in states:
                T.set_switches(model, cfg, state)
                loss = T.train_step(fwd, opts, batches, run, cfg.grad_clip_norm)
    finally:
        torch._dynamo.reset()
    assert torch.isfinite(loss)

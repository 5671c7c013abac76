"""Late QAT must really act inside a compiled graph (the seed code's class-level flag was frozen by torch.compile): our
per-module Python flag is guarded, so each setting has its own graph, and switching back reuses the first one."""
import copy

import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_qat_switch_takes_effect_under_compile(backend):
    torch._dynamo.reset()
    cfg, _ = T.config_from_env(TINY_ENV)
    torch.manual_seed(0)
    model = T.GPT(cfg)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, T.QLinear):
                m.weight.normal_(0, 0.3)
    # reference: an eager model whose weights ARE the int6 grid
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, T.QLinear):
                m.weight.copy_(T.fake_quant_rows(m.weight, T.INT6_MAX, T.Config.int6_clip_k))   # the export grid
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True, dynamic=False)
    off = compiled(x, x)
    model.set_qat(True)
    on = compiled(x, x)
    model.set_qat(False)
    off_again = compiled(x, x)
    assert not torch.allclose(on, off)
    assert torch.allclose(on, ref(x, x), atol=1e-5)
    assert torch.allclose(off_again, off, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2, "one graph per QAT setting, none on switching back"


def test_qat_gradient_is_straight_through():
    cfg, _ = T.config_from_env(TINY_ENV)
    lin = T.QLinear(8, 4)
    lin.qat = True
    x = torch.randn(3, 8)
    lin(x).sum().backward()
    assert torch.allclose(lin.weight.grad, x.sum(0).expand(4, 8))

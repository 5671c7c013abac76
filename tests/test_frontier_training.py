"""The frontier records' training-time settings, each off by default: Polar-Express Newton-Schulz (MUON_NS, #1344,
#1787), the warm-down floor (MIN_LR, #1787) and the progressive training context (SEQ_SCHEDULE, SEQ_REWARM_STEPS,
#2014), this last one in a tiny compiled training run."""
import contextlib
import re

import numpy as np
import pytest
import torch

import train_gpt as T
from helpers import TINY_ENV

# The five (a, b, c) tuples of #1787 and #1855 (_PE_COEFFS, taken from #1344): Polar Express, arXiv 2505.16932
POLAR = ((8.156554524902461, -22.48329292557795, 15.878769915207462),
         (4.042929935166739, -2.808917465908714, 0.5000178451051316),
         (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
         (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
         (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
# Where the five polar steps take every singular value of 1e-3..1 (the composed scalar polynomial, on a fine grid):
# the band they were fitted for, 1 +- 0.1412; the jordan tuple ends in 0.47..1.21
POLAR_BAND = (0.8588, 1.1412)


def compose(coeffs, s: np.ndarray) -> np.ndarray:
    for a, b, c in coeffs:
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def test_polar_coefficients_are_the_records_and_keep_every_singular_value_in_their_band():
    assert T.NS_COEFFS["polar"] == POLAR and T.NS_COEFFS["jordan"] == ((3.4445, -4.7750, 2.0315),) * 5
    s = np.geomspace(1e-3, 1, 100_001)
    polar, jordan = compose(T.NS_COEFFS["polar"], s), compose(T.NS_COEFFS["jordan"], s)
    assert POLAR_BAND[0] < polar.min() and polar.max() < POLAR_BAND[1]
    assert jordan.min() < 0.5 and jordan.max() > 1.2


@pytest.mark.parametrize("shape", [(3, 64, 128), (2, 96, 48)])
def test_polar_newton_schulz_orthogonalises_a_random_matrix_better_than_jordan(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    gap = {name: float((torch.linalg.svdvals(T.newton_schulz(g, T.NS_COEFFS[name])) - 1).abs().max())
           for name in ("jordan", "polar")}
    assert gap["polar"] < POLAR_BAND[1] - 1 + 1e-4, gap     # the band, up to float32 rounding
    assert gap["polar"] < gap["jordan"] - 0.1, gap           # measured 0.141 against 0.318


def muon_update(cfg: T.Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Muon step of the tiny model built by build_optimizers from cfg: (gradient, weight before, weight after) of
    its first matrix, weight decay off."""
    model = T.GPT(cfg)
    opts = T.build_optimizers(model, cfg, T.Run())
    muon = next(o for o in opts if isinstance(o, T.Muon))
    muon.param_groups[0]["weight_decay"] = 0.0
    gen = torch.Generator().manual_seed(1)
    for p in muon.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=gen)
    p = muon.param_groups[0]["params"][0]
    before = p.detach().clone()
    muon.step()
    return p.grad, before, p.detach()


def test_muon_ns_polar_reaches_the_optimizer():
    """MUON_NS=polar: the step is -lr x polar-NS(row-normalised gradient), and measurably not the jordan one."""
    cfg, _ = T.config_from_env(dict(TINY_ENV, MUON_NS="polar"))
    g, before, after = muon_update(cfg)
    rows = g / g.norm(dim=-1, keepdim=True)   # the first step's Nesterov momentum is (1 + mu) g: its row norm is g's
    scale = max(1.0, g.size(0) / g.size(1)) ** 0.5
    step = {name: -cfg.matrix_lr * scale * T.newton_schulz(rows[None], T.NS_COEFFS[name])[0]
            for name in ("jordan", "polar")}
    torch.testing.assert_close(after - before, step["polar"], rtol=0, atol=1e-6)
    assert (step["polar"] - step["jordan"]).abs().max() > 100 * 1e-6


def test_muon_ns_is_checked():
    with pytest.raises(T.RunError, match="MUON_NS='polarexpress' must be one of jordan, polar"):
        T.config_from_env({"MUON_NS": "polarexpress"})


def test_min_lr_floors_the_warm_down():
    """lr_scale: 1 before the warm-down, the linear decay until it meets MIN_LR, MIN_LR at the end of the run; and
    set_schedule gives the optimizers that floor."""
    assert T.lr_scale(0.27, 0.72, 0.1) == 1.0 and T.lr_scale(1.0, 0.72, 0.1) == 0.1
    assert T.lr_scale(0.64, 0.72, 0.1) == pytest.approx(0.5) and T.lr_scale(0.95, 0.72, 0.1) == 0.1
    assert T.lr_scale(1.0, 0.72) == 0.0, "MIN_LR's default: the decay to 0"
    cfg, _ = T.config_from_env(dict(TINY_ENV, MIN_LR="0.1"))
    opts = T.build_optimizers(T.GPT(cfg), cfg, T.Run())
    for progress, expected in ((0.2, 1.0), (1.0, 0.1)):
        T.set_schedule(opts, cfg, 100, progress)
        ratios = [g["lr"] / g["base_lr"] for o in opts for g in o.param_groups]
        assert ratios == pytest.approx([expected] * len(ratios))


@pytest.mark.parametrize("value", ["1.5", "-0.1"])
def test_min_lr_is_checked(value):
    with pytest.raises(T.RunError, match="MIN_LR"):
        T.config_from_env({"MIN_LR": value})


@pytest.mark.parametrize("env, fragment", [
    ({"SEQ_SCHEDULE": "1024,2048@x"}, "must be lengths from increasing fractions"),
    ({"SEQ_SCHEDULE": "1024@0.1,2048@0.5"}, "the first from 0"),
    ({"SEQ_SCHEDULE": "1024,2048@0.7,1536@0.3"}, "increasing"),
    ({"SEQ_SCHEDULE": "1024,2048@1"}, r"\[0, 1\)"),
    ({"SEQ_SCHEDULE": "1024,3072@0.5"}, "ends at 3072 tokens per sequence: TRAIN_SEQ_LEN=2048 must be that last"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@1"}, "use SEQ_SCHEDULE"),
])
def test_seq_schedule_is_checked(env, fragment):
    with pytest.raises(T.RunError, match=fragment):
        T.config_from_env(env)


def test_every_length_must_divide_the_micro_batch():
    cfg, _ = T.config_from_env({"SEQ_SCHEDULE": "1000,2048@0.5"})
    with pytest.raises(T.RunError, match=r"lengths \[1000\] do not divide the micro-batch of 98304 tokens"):
        T.batch_split(cfg, T.Run())


def test_the_warm_up_plans_each_length_in_each_switch_state():
    cfg, _ = T.config_from_env({"SEQ_SCHEDULE": "1024,2048@0.1,3072@0.7", "TRAIN_SEQ_LEN": "3072"})
    assert T.warmup_plan(cfg) == [(1024, (False, False)), (2048, (False, False)), (2048, (True, False)),
                                  (3072, (True, False)), (3072, (True, True))]
    assert T.plan_label(cfg, 2048, (True, False)) == "seq2048_recur1_qat0"
    assert T.plan_label(T.Config(), 2048, (True, False)) == "recur1_qat0", "no schedule: the log line of before"


ITERS, REWARM = 12, 3
# progress = step / 12: 16 tokens per sequence for steps 0-3, 32 from step 4 (0.33) with the recurrence switched on in
# the same step, 64 from step 8 (0.67); no QAT. Three graphs: each costs seconds of aot_eager tracing on a CPU
SCHEDULE = dict(SEQ_SCHEDULE="16,32@0.3,64@0.6", TRAIN_SEQ_LEN="64", SEQ_REWARM_STEPS=str(REWARM),
                RECUR_START_FRAC="0.3", LATE_QAT_FRAC="0", ITERATIONS=str(ITERS), GPTQ_CALIB_BATCHES="2")


def watch_calibration(mp: pytest.MonkeyPatch, shapes: list) -> None:
    """collect_hessians (the reserve's timing and the calibration), noting the shape of each batch it reads."""
    real = T.collect_hessians
    mp.setattr(T, "collect_hessians", lambda model, batches, run: real(
        model, (shapes.append(tuple(x.shape)) or (x, y) for x, y in batches), run))


def test_the_loader_starts_at_the_first_length_and_the_calibration_reads_the_last(tiny_data, monkeypatch):
    """Both calibration paths (the reserve's timing, the calibration itself) read TRAIN_SEQ_LEN, wherever the run
    stopped in the schedule; the loader hands out the first length until it is told otherwise."""
    data, tok = tiny_data
    cfg, _ = T.config_from_env(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), GPTQ_RESERVE_SECONDS="0",
                                    **SCHEDULE))
    model, shapes = T.GPT(cfg), []
    watch_calibration(monkeypatch, shapes)
    loader = T.TrainLoader(cfg, T.Run(), local_tokens=64)
    assert [tuple(x.shape) for x, _ in loader.next_step(2)] == [(4, 16)] * 2
    T.calibration_reserve(model, loader, cfg, T.Run())
    loader.set_length(32)
    T.calibrate(model, loader, cfg, T.Run(), T.WallClock(0))
    assert len(shapes) == 2 + 2 and set(shapes) == {(1, 64)}


class AotEagerRun(T.Run):
    """COMPILE=1 AUTOCAST=bf16's dynamo guards, AOT autograd and fullgraph, with aot_eager: no inductor code
    generation (minutes per graph on a CPU), the same recompiles."""

    def compile(self, fn, fullgraph: bool = False):
        return torch.compile(fn, dynamic=False, fullgraph=True, backend="aot_eager")


@pytest.fixture(scope="module")
def progressive(tiny_data):
    """The tiny model trained compiled with SCHEDULE: per training step the micro-batch shapes and each optimizer's
    LR over its base; the calibration's batch shapes; the log. A recompile after the warm-up is an error."""
    data, tok = tiny_data
    cfg, _ = T.config_from_env(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), **SCHEDULE))
    steps, calib, lines, warm = [], [], [], []
    real_warmup, real_step, frozen = T.compile_warmup, T.train_step, contextlib.ExitStack()

    def warmup_then_freeze(*args):
        out = real_warmup(*args)
        frozen.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
        warm.append(True)
        return out

    def train_step(fwd, opts, batches, run, clip):
        if warm:   # after the warm-up: a step of the run
            lrs = [o.param_groups[0]["lr"] / o.param_groups[0]["base_lr"] for o in opts]
            steps.append(([tuple(x.shape) for x, _ in batches], lrs))
        return real_step(fwd, opts, batches, run, clip)

    mp = pytest.MonkeyPatch()
    for name, fn in (("compile_warmup", warmup_then_freeze), ("train_step", train_step),
                     ("log", lambda msg, console=True: lines.append(msg))):
        mp.setattr(T, name, fn)
    watch_calibration(mp, calib)
    torch._dynamo.reset()
    try:
        T.train_phase(cfg, AotEagerRun(compiled=True, amp=torch.bfloat16), None)
    finally:
        frozen.close()
        mp.undo()
        torch._dynamo.reset()
    return cfg, steps, calib, lines


def test_progressive_context_switches_at_the_agreed_steps(progressive):
    cfg, steps, calib, lines = progressive
    switches = [tuple(map(int, m)) for m in re.findall(r"^seq_len:(\d+) step:(\d+) train_time:\d+ms$", "\n".join(lines),
                                                       re.M)]
    assert switches == [(32, 4), (64, 8)]
    assert any(re.fullmatch(r"recurrence:on step:4 train_time:\d+ms", line) for line in lines)
    assert "compile_warmup steps:3 states:seq16_recur0_qat0 seq32_recur1_qat0 seq64_recur1_qat0" in lines


def test_micro_batches_hold_sequences_of_the_current_length(progressive):
    """The same 64 tokens per micro-batch (TRAIN_BATCH_TOKENS / 8), cut into 4 x 16, 2 x 32, then 1 x 64; the
    calibration reads the last length."""
    cfg, steps, calib, lines = progressive
    assert len(steps) == ITERS
    expected = [(4, 16)] * 4 + [(2, 32)] * 4 + [(1, 64)] * 4
    assert [shapes for shapes, _ in steps] == [[shape] * 8 for shape in expected]
    assert calib and set(calib) == {(1, 64)}


def test_the_lr_rewarms_after_each_length_change(progressive):
    """LR / schedule = (k + 1) / SEQ_REWARM_STEPS on the k-th step after a change, else 1, on every optimizer."""
    cfg, steps, calib, lines = progressive
    rewarm = [1, 1, 1, 1, 1 / 3, 2 / 3, 1, 1, 1 / 3, 2 / 3, 1, 1]
    for step, ((_, ratios), r) in enumerate(zip(steps, rewarm)):
        assert ratios == pytest.approx([r * T.lr_scale(step / ITERS, cfg.warmdown_frac)] * len(ratios)), step

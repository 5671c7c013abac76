"""The GPU's code path on a CPU: COMPILE=1 AUTOCAST=bf16 runs the graphs a GPU run compiles (inductor, bf16 autocast,
DDP around the compiled module on 2 gloo ranks, the compiled Newton-Schulz, the eval and TTT graphs), minus the
kernels. What TORCH_LOGS=graph_breaks,recompiles prints is what these tests count."""
import re

import pytest

from helpers import parse_log, run_script, script_env

# bf16 keeps 8 significant bits: one rounding is off by at most 2^-9 (0.2%) relative. A loss is a mean over hundreds
# of tokens whose rounding errors do not add up coherently, and 12 steps of training let the two runs drift apart a
# little: 1% relative (five roundings' worth) separates "the same computation in bf16" from a different one.
BF16_LOSS_RTOL = 0.01
RUN = dict(ITERATIONS="12", VAL_TOKENS="3000", TTT_CHUNK_TOKENS="512", SLOT_STEPS="2", EVAL_COMPARE_PLAIN="0")


def _body(text: str, after: str, before: str | None = None) -> str:
    """The merged output between the first line starting with `after` and the first later one starting with `before`."""
    start = re.search(rf"^{re.escape(after)}", text, re.M)
    assert start, f"no line starts with {after!r}"
    text = text[start.end():]
    end = re.search(rf"^{re.escape(before)}", text, re.M) if before else None
    return text[:end.start()] if end else text


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The tiny configuration on 2 ranks, eager float32 and compiled bf16, same seed and data."""
    data, tok = tiny_data
    work = tmp_path_factory.mktemp("compiled")
    out = {}
    for name, extra in (("eager", dict(COMPILE="0", AUTOCAST="off")),
                        ("compiled", dict(COMPILE="1", AUTOCAST="bf16", TORCH_LOGS="graph_breaks,recompiles"))):
        env = script_env(data, tok, work / "logs", RUN_ID=name, **RUN, **extra)
        r = run_script(env, work, nproc=2, timeout=1500, merge_output=True)
        assert r.returncode == 0, r.stdout[-5000:]
        out[name] = (r.stdout, parse_log(work / "logs" / f"{name}.txt"), (work / "logs" / f"{name}.txt").read_text())
    return out


def test_the_compiled_run_trains_exports_and_evaluates_with_every_switch(runs):
    text, lines, log = runs["compiled"]
    assert lines["compile_warmup"]["states"] == "recur0_qat0"   # parse_log keeps the first word's fields only
    assert "compile_warmup steps:3 states:recur0_qat0 recur1_qat0 recur1_qat1" in log
    assert "recurrence" in lines and "late_qat" in lines, "the run crosses both switches"
    assert "\nrank_sync: identical weights\n" in log
    assert int(lines["code_bytes"]["total_submission_bytes"]) > 0 and "final_slot_ttt_exact" in lines


def test_no_graph_break_anywhere(runs):
    text = runs["compiled"][0]
    assert "__graph_breaks" not in text and "Graph break" not in text


def test_no_recompile_inside_the_clock_or_the_eval(runs):
    """The warm-up compiles every switch state (recurrence off/on, QAT off/on); after it, nothing recompiles until
    the end of training, and the evaluation (a fresh model: compiled once per graph) never recompiles."""
    text = runs["compiled"][0]
    assert "Recompiling function" in _body(text, "", "compile_warmup steps:"), "the warm-up's switch states do show up"
    training = _body(text, "compile_warmup steps:", "train_done")
    assert "Recompiling function" not in training, training[:3000]
    evaluation = _body(text, "artifact_model")
    assert "Recompiling function" not in evaluation, evaluation[:3000]


def test_compiled_bf16_losses_agree_with_eager_float32(runs):
    eager, compiled = runs["eager"][2], runs["compiled"][2]
    steps = lambda log: {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)}
    a, b = steps(eager), steps(compiled)
    assert a.keys() == b.keys() and len(a) >= 6
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=BF16_LOSS_RTOL), (k, a[k], b[k])
    fa, fb = runs["eager"][1]["final_slot_ttt_exact"], runs["compiled"][1]["final_slot_ttt_exact"]
    assert float(fb["val_loss"]) == pytest.approx(float(fa["val_loss"]), rel=BF16_LOSS_RTOL)
    assert fa["scored_tokens"] == fb["scored_tokens"] and fa["scored_bytes"] == fb["scored_bytes"]

"""The GPU's code path on a CPU: COMPILE=1 AUTOCAST=bf16 runs the graphs a GPU run compiles (inductor, bf16 autocast,
the compiled forward on 2 gloo ranks, the compiled Newton-Schulz of the sharded Muon, the eval and TTT graphs), minus
the kernels. What TORCH_LOGS=graph_breaks,recompiles prints is what these tests count, with tools/gpu_check.py's
counter."""
import math
import re
import subprocess
import sys

import pytest

from helpers import ROOT, parse_log, run_script, script_env

sys.path.insert(0, str(ROOT / "tools"))
from gpu_check import compile_counts  # noqa: E402

# 2,048 tokens a step (4 x the tiny default): bf16's rounding differences average out over more tokens, so the two runs
# part less in 12 steps (the median gap of the final val_loss falls from 1.5e-4 at 512 tokens to 3e-5).
# The stream mode's eval: the document mode's graphs (four widths with the adapters' backward) cost minutes of
# inductor on a CPU; their recompiles are counted in tests/test_documents.py (aot_eager) and README's tiny run.
RUN = dict(ITERATIONS="12", TRAIN_BATCH_TOKENS="2048", VAL_TOKENS="3000", TTT_CHUNK_TOKENS="512", SLOT_STEPS="2",
           EVAL_COMPARE_PLAIN="0", TRAIN_LOG_EVERY="1", EVAL_MODE="stream")
# The reference is the same run eager in bf16 (COMPILE=0 AUTOCAST=bf16): what inductor must reproduce, up to rounding.
# Measured with this RUN on 2 ranks, compiled against eager bf16, as (final val_loss relative, train losses RMS over
# the 12 steps): torch 2.13, seeds 1337, 1, 2, 3, 4: (2.9e-5, 2.6e-4), (1.4e-5, 2.0e-4), (4.1e-5, 3.1e-4),
# (1.7e-4, 4.5e-4), (1.0e-5, 2.5e-4); torch 2.9.1, seeds 1337, 3: (1.1e-4, 2.5e-4), (1.6e-4, 4.3e-4). Against eager
# float32, the reference before: (1.4e-4, 6.9e-4) at 512 tokens a step. Twelve steps of bf16 training part two runs
# like this whatever the code. A different computation in the compiled run instead (seed 1337, torch 2.13):
#   recurrence from 90% of the run, not 35%: (7.2e-4, 1.7e-3), on 2.9.1 (7.1e-4, 1.65e-3)
#   QK gain 10 instead of 5: (3.4e-4, 8.6e-4)      QK gain 2.5: (1.1e-4, 6.0e-4)
#   QK gain 4.5: (3.8e-5, 2.4e-4)                  QAT off: (2.5e-5, 2.3e-4)
# The tolerances sit between the largest gap and the late recurrence: they catch the recurrence switched late (2x and
# 2.4x over) and a QK gain doubled (steps, 1.2x over), and cannot see a QK gain halved or 10% off or QAT turned off,
# which move the losses about as much as bf16 does. Whether the compiled graph reads the QAT flag at all is checked by
# test_the_warmup_compiles_the_forward_again_for_the_recurrence_and_the_qat_switch.
VAL_LOSS_RTOL = 3.5e-4
STEP_LOSS_RMS = 7e-4


def _body(text: str, after: str, before: str | None = None) -> str:
    """The merged output between the first line starting with `after` and the first later one starting with `before`."""
    start = re.search(rf"^{re.escape(after)}", text, re.M)
    assert start, f"no line starts with {after!r}"
    text = text[start.end():]
    end = re.search(rf"^{re.escape(before)}", text, re.M) if before else None
    return text[:end.start()] if end else text


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory):
    """The tiny configuration on 2 ranks, eager bf16 and compiled bf16, same seed and data."""
    data, tok = tiny_data
    work = tmp_path_factory.mktemp("compiled")
    out = {}
    for name, extra in (("eager", dict(COMPILE="0", AUTOCAST="bf16")),
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
    assert "\nconfig.doc_attention:True\n" in log, "the default: the graphs hold the document mask"
    assert int(lines["code_bytes"]["total_submission_bytes"]) > 0 and "final_slot_ttt_exact" in lines


def test_no_graph_break_anywhere(runs):
    text = runs["compiled"][0]
    assert compile_counts(text)["graph_breaks"] == 0 and "__graph_breaks" not in text


def test_dynamo_prints_the_recompile_limit_hit_that_the_counter_finds(tmp_path):
    """A function past its recompile limit runs eagerly with no more "Recompiling" lines: a count of those alone
    passes. Here the installed torch hits the limit (2 compiles, 5 dtypes) and prints what compile_counts finds."""
    script = ("import torch\ntorch._dynamo.config.recompile_limit = 2\nf = torch.compile(lambda x: x + 1, backend='eager')\n"
              "for dtype in (torch.float32, torch.float64, torch.int32, torch.int64, torch.int16):\n"
              "    f(torch.ones(2, dtype=dtype))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={"TORCH_LOGS": "graph_breaks,recompiles", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert compile_counts(text)["recompile_limit_hits"] == 1, text[-3000:]
    assert compile_counts(text)["recompiles"]["total"] == 2, "4 dtype changes: a recompile, the hit, then silence"


def test_no_recompile_limit_hit(runs):
    assert compile_counts(runs["compiled"][0])["recompile_limit_hits"] == 0


def test_no_recompile_inside_the_clock_or_the_eval(runs):
    """The warm-up compiles every switch state (recurrence off/on, QAT off/on); after it, nothing recompiles until
    the end of training, and the evaluation (a fresh model: compiled once per graph) never recompiles."""
    text = runs["compiled"][0]
    training = _body(text, "compile_warmup steps:", "train_done")
    assert "Recompiling function" not in training, training[:3000]
    evaluation = _body(text, "artifact_model")
    assert "Recompiling function" not in evaluation, evaluation[:3000]


def test_the_warmup_compiles_the_forward_again_for_the_recurrence_and_the_qat_switch(runs):
    """The compiled forward reads both switches: each one's first flip fails a guard on it and recompiles. A flag the
    graph never reads (QAT frozen at compile time, the seeds' bug) fails no guard, and the switch changes nothing."""
    warmup = _body(runs["compiled"][0], "", "compile_warmup steps:")
    guards = re.findall(r"\[__recompiles\]\s+- \d+/\d+: (\S+) == False", warmup)
    assert any(g.endswith(".recur_on") for g in guards), warmup[-3000:]
    assert any(g.endswith(".qat") for g in guards), warmup[-3000:]


def _step_losses(log: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step:(\d+)/\d+ train_loss:(\S+)", log, re.M)}


def test_compiled_final_score_matches_eager_bf16_within_3_5e_4(runs):
    fa, fb = runs["eager"][1]["final_slot_ttt_exact"], runs["compiled"][1]["final_slot_ttt_exact"]
    assert fa["scored_tokens"] == fb["scored_tokens"] and fa["scored_bytes"] == fb["scored_bytes"]
    assert float(fb["val_loss"]) == pytest.approx(float(fa["val_loss"]), rel=VAL_LOSS_RTOL)


def test_compiled_train_losses_follow_eager_bf16_within_7e_4_rms(runs):
    a, b = _step_losses(runs["eager"][2]), _step_losses(runs["compiled"][2])
    assert a.keys() == b.keys() == set(range(1, 13))
    rms = math.sqrt(sum((b[k] - a[k]) ** 2 for k in a) / len(a))
    assert rms <= STEP_LOSS_RMS, {k: (a[k], b[k]) for k in a}

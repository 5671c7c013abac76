"""Multi-process code paths on CPU (gloo): sharded evaluation agrees with one process; 2-rank training completes."""
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import parse_log, run_script, script_env


@pytest.fixture(scope="module")
def artifact(tiny_data, tmp_path_factory):
    data, tok = tiny_data
    work = tmp_path_factory.mktemp("dist")
    # SLOT's warm start carries state within a rank, so a rank's first batch starts cold: with it on, the score
    # depends (legally) on the rank count. The 1-vs-2 comparison runs SLOT without it, and the plain window too;
    # TTT (float32 sums in another order) has its own 1-vs-2 test below, to a looser tolerance.
    env = script_env(data, tok, work / "logs", RUN_ID="two", NLL_DUMP_PATH=str(work / "nll2.npy"),
                     SLOT_WARM_START="0", TTT_EPOCHS="0", EVAL_COMPARE_PLAIN="1", EVAL_MODE="stream")
    r = run_script(env, work, nproc=2)   # train, export and evaluate with 2 processes
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, env


def test_two_process_training_completes(artifact):
    work, env = artifact
    lines = parse_log(work / "logs" / "two.txt")
    assert lines["world_size"]["world_size"] == "2"
    assert lines["model_params"]["grad_accum"] == "4"
    assert lines["train_done"]["steps"] == "6" and "final_slot_exact" in lines
    # the recurrence switch (RECUR_START_FRAC 0.35 of 6 steps) crossed by the sharded optimizer: identical weights
    assert lines["recurrence"]["recurrence"] == "on" and lines["recurrence"]["step"] == "3"
    body = (work / "logs" / "two.txt").read_text().split("\n" + "=" * 100 + "\n", 1)[1]
    assert "\nrank_sync: identical weights\n" in body


def test_one_and_two_processes_score_the_same_artifact_alike(artifact):
    work, env = artifact
    two = parse_log(work / "logs" / "two.txt")["final_slot_exact"]   # SLOT without warm start: rank count must not matter
    env1 = dict(env, PHASES="eval", RUN_ID="one", ARTIFACT_PATH=str(work / "logs" / "two.pgz"),
                NLL_DUMP_PATH=str(work / "nll1.npy"))
    r = run_script(env1, work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    one = parse_log(work / "logs" / "one.txt")["final_slot_exact"]
    plain1 = parse_log(work / "logs" / "one.txt")["final_sliding_window_exact"]
    plain2 = parse_log(work / "logs" / "two.txt")["final_sliding_window_exact"]
    assert float(plain1["val_loss"]) == pytest.approx(float(plain2["val_loss"]), rel=1e-7)
    assert one["scored_tokens"] == two["scored_tokens"] and one["scored_bytes"] == two["scored_bytes"]
    assert float(one["val_loss"]) == pytest.approx(float(two["val_loss"]), rel=1e-7)
    assert float(one["val_bpb"]) == pytest.approx(float(two["val_bpb"]), rel=1e-7)
    np.testing.assert_allclose(np.load(work / "nll1.npy"), np.load(work / "nll2.npy"), rtol=1e-5, atol=1e-6)


def test_ranks_stay_identical_when_the_clock_drives_the_schedule(tiny_data, tmp_path):
    """With a wall-clock cap the warm-down and late QAT follow elapsed time. Every rank must use the same (agreed)
    time, or each applies its own learning rate and the copies drift apart."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="clock", PHASES="train,export", ITERATIONS="100000",
                     MAX_WALLCLOCK_SECONDS="2.5", WARMDOWN_FRAC="0.9", LATE_QAT_FRAC="0.5")
    r = run_script(env, tmp_path, nproc=2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = parse_log(tmp_path / "logs" / "clock.txt")
    assert "stopping_early" in lines and "late_qat" in lines
    body = (tmp_path / "logs" / "clock.txt").read_text().split("\n" + "=" * 100 + "\n", 1)[1]   # not the source block
    assert "\nrank_sync: identical weights\n" in body


def test_ttt_on_one_and_two_processes_agrees(artifact):
    """Score-first TTT with SLOT (no warm start) on 1 and 2 gloo processes: the chunk's gradient is averaged across
    ranks, so both runs adapt the same weights and score alike (to float32 tolerance)."""
    work, env = artifact
    lines = {}
    for n in (1, 2):
        e = dict(env, PHASES="eval", RUN_ID=f"ttt{n}", ARTIFACT_PATH=str(work / "logs" / "two.pgz"), TTT_EPOCHS="2",
                 TTT_CHUNK_TOKENS="256", TTT_LR="0.01", EVAL_COMPARE_PLAIN="0")
        e.pop("NLL_DUMP_PATH")
        r = run_script(e, work, nproc=n)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        lines[n] = parse_log(work / "logs" / f"ttt{n}.txt")["final_slot_ttt_exact"]
    assert lines[1]["scored_tokens"] == lines[2]["scored_tokens"]
    assert int(lines[1]["ttt_chunks_trained"]) == int(lines[2]["ttt_chunks_trained"]) > 2
    assert float(lines[1]["val_loss"]) == pytest.approx(float(lines[2]["val_loss"]), rel=1e-5)
    plain = parse_log(work / "logs" / "two.txt")["final_slot_exact"]
    assert float(lines[1]["val_loss"]) != float(plain["val_loss"]), "TTT changed nothing"


def run_injected(tiny_data, tmp_path, target: str, timeout: int, within: float, **extra) -> list[str]:
    """Run 2 ranks under torchrun with FAIL_AT=target (tests/inject_failure.py); assert that the run failed and ended
    within `within` seconds of the injection; return rank 0's error lines (asserting there is exactly one)."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="fail", FAIL_AT=target, TTT_EPOCHS="0", SLOT_STEPS="0",
                     **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "inject_failure.py")]
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    ended = time.time()
    injected = re.search(r"INJECTED (\d+\.\d+)", r.stderr)
    assert injected, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.returncode != 0
    assert ended - float(injected.group(1)) < within, f"the ranks took {ended - float(injected.group(1)):.1f}s to end"
    errors = [line for line in (tmp_path / "logs" / "fail.txt").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors


@pytest.mark.parametrize("target", ["train_step@1@4", "collect_hessians@1@1", "pack_state@0@1", "read_artifact@1@1",
                                    "score_document_batch@1@1"])
def test_an_exception_on_one_rank_ends_every_rank_with_its_reason_in_rank_0s_log(tiny_data, tmp_path, target):
    """A non-RunError failure on one rank, in each phase (training step, calibration, export on rank 0, read-back,
    evaluation): both processes end within seconds and rank 0's log gets one error line naming the failing rank and
    its exception. On gloo a dead peer also ends the other rank (with "Connection closed by peer"), so what proves
    the failure watch here is the error line: without the watch, the four cases where rank 1 fails log gloo's
    message instead (tried 2026-12-07). A rank that never fails but blocks: the next test."""
    errors = run_injected(tiny_data, tmp_path, target, timeout=240, within=20)
    name, rank, _ = target.split("@")
    assert f"injected failure in {name}" in errors[0] and "ValueError" in errors[0]
    assert rank == "0" or f"rank {rank}" in errors[0]


@pytest.mark.parametrize("target", ["train_step@1@4@hang", "collect_hessians@1@1@hang"])
def test_a_rank_that_blocks_without_an_exception_ends_every_rank(tiny_data, tmp_path, target):
    """Rank 1 blocks (a sleep standing for a hung compile or kernel) in a training step or in the calibration, so
    rank 0 waits in its next collective: the watchdog (WATCHDOG_SECONDS=5 here) names rank 1 in rank 0's log and
    both processes end within seconds. Without it they would wait for the 30-minute process-group timeout (the
    120 s timeout of run_injected then fails the test; tried 2026-12-07)."""
    errors = run_injected(tiny_data, tmp_path, target, timeout=120, within=25, WATCHDOG_SECONDS="5")
    assert errors[0].startswith("error: rank 1 stalled: computing for"), errors[0]


def test_a_long_evaluation_is_not_a_stall(artifact):
    """Scoring runs for seconds without a collective (one chunk, no TTT): here every batch is made 0.25 s slower
    (SLOW_AT), so each rank scores for several watchdog periods, and each batch marks progress: a watchdog of 2 s
    does not fire (without the marks it does: tried 2026-12-07)."""
    work, env = artifact
    e = dict(env, PHASES="eval", RUN_ID="long", ARTIFACT_PATH=str(work / "logs" / "two.pgz"), WATCHDOG_SECONDS="2",
             SLOT_STEPS="0", TTT_EPOCHS="0", EVAL_COMPARE_PLAIN="0", EVAL_BATCH_WINDOWS="32", EVAL_MODE="stream",
             SLOW_AT="scored_log_probs:0.25")
    e.pop("NLL_DUMP_PATH")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "inject_failure.py")]
    r = subprocess.run(cmd, env=e, cwd=work, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = parse_log(work / "logs" / "long.txt")
    assert float(lines["final_sliding_window_exact"]["eval_time"].removesuffix("ms")) > 4000, "2 watchdog periods"


def test_a_slot_cut_is_agreed_by_both_ranks(artifact):
    """Rank 1's SLOT is made slow (SLOW_AT=slot_fit:0.3@1): only its budget projects past EVAL_BUDGET_SECONDS, yet
    both ranks score with the cut, because the smallest proposal wins at every agreement (agree_plan); gather_result
    then checks that every rank's rounds used the same settings, or the run fails. Without the agreement, rank 0 keeps
    8 steps while rank 1 cuts, and that check ends the run (tried 2026-12-07)."""
    work, env = artifact
    e = dict(env, PHASES="eval", RUN_ID="agree", ARTIFACT_PATH=str(work / "logs" / "two.pgz"), EVAL_MODE="document",
             LORA_RANK="0", PHASE_COUNT="0", SLOT_STEPS="8", EVAL_COMPARE_PLAIN="0",
             EVAL_BATCH_WINDOWS="4", EVAL_BUDGET_SECONDS="12", SLOW_AT="slot_fit:0.3@1")
    e.pop("NLL_DUMP_PATH")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "inject_failure.py")]
    r = subprocess.run(cmd, env=e, cwd=work, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = (work / "logs" / "agree.txt").read_text()
    lines = parse_log(work / "logs" / "agree.txt")
    final = lines["final_document_slot_exact"]
    assert int(final["budget_cuts"]) > 0 and float(final["slot_steps_mean"]) < 8, final
    assert "agreed by all ranks" in text
    assert "eval_budget: rank 0 at" not in text, "rank 0 (fast) proposed no cut itself"

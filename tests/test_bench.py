"""tools/bench.py: the FLOP model against a hand count and the issue's 2.1e14, and one CPU run of every section."""
import itertools
import json
import statistics
import subprocess
import sys

import pytest
import torch

import train_gpt as tg
from helpers import ROOT, TINY_ENV, script_env

sys.path.insert(0, str(ROOT / "tools"))
import bench  # noqa: E402

BENCH = ROOT / "tools" / "bench.py"


def tiny_config() -> tg.Config:
    return tg.config_from_env(TINY_ENV)[0]


def test_flop_model_hand_count_tiny():
    cfg = tiny_config()   # d 32, 3 layers, layer 1 twice (4 passes), heads 2/1 of 16, MLP 2x, V 320, bigram dim 8
    d, kv, hidden = 32, 16, 64
    per_layer = d * d + 2 * d * kv + d * d + 2 * d * hidden    # q, k and v, attention out, MLP in and out
    passes = 4
    weights = passes * per_layer + 320 * d + 8 * d + 128 * kv  # + tied head + bigram and value-embedding projections
    f = bench.train_flops(tg.GPT(cfg), cfg.train_seq_len, cfg.train_batch_tokens)
    assert f["passes"] == passes and f["matmul_weights_per_token"] == weights
    assert f["matmul_flop_per_token"] == 6 * weights
    assert f["attention_flop_per_token"] == 6 * d * cfg.train_seq_len * passes
    assert f["flop_per_step"] == (6 * weights + 6 * d * cfg.train_seq_len * passes) * cfg.train_batch_tokens


def test_flop_model_default_config_is_issue_figure():
    """Issue 5: ~2.1e14 FLOP per 786,432-token step for the 13-pass model (RECUR_LAYERS=4,5, 512 wide, seq 2048);
    the default 11-pass model does 11/13 of its block work."""
    cfg = tg.config_from_env({"RECUR_LAYERS": "4,5"})[0]
    with torch.device("meta"):   # shapes only: the orthogonal init of the real model takes seconds on a busy CPU
        model, plain = tg.GPT(cfg), tg.GPT(tg.Config())
    f = bench.train_flops(model, cfg.train_seq_len, cfg.train_batch_tokens)
    assert f["passes"] == 13 and cfg.train_batch_tokens == 786_432
    assert f["flop_per_step"] == pytest.approx(2.1e14, rel=0.05)
    assert 6 * 30e6 < f["matmul_flop_per_token"] < 6 * 32e6    # "6 x 31M matmul parameters" (ANCHORS.md)
    g = bench.train_flops(plain, cfg.train_seq_len, cfg.train_batch_tokens)
    assert g["passes"] == 11 and g["weights_body"] * 13 == f["weights_body"] * 11


def test_count_windows_matches_build_windows():
    for n, seq, stride in itertools.product((2, 3, 33, 34, 41, 100, 2049, 2050, 5000), (1, 4, 32, 2048), (1, 3, 8, 64)):
        if stride <= seq:
            assert bench.count_windows(n, seq, stride) == len(tg.build_windows(n, seq, stride)), (n, seq, stride)


def positive_numbers(tree, path=""):
    """Every number in the tree, with its path; None (MFU with no peak) and booleans are skipped."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k not in ("slot", "ttt"):   # SLOT and TTT settings (focal 0, warm start 0) are settings, not measurements
                yield from positive_numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from positive_numbers(v, f"{path}[{i}]")
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield path, tree


def test_bench_runs_every_section_on_cpu(tiny_data, tmp_path):
    data, tok = tiny_data
    out = tmp_path / "bench.json"
    env = script_env(data, tok, tmp_path / "logs", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="600")
    cmd = [sys.executable, str(BENCH), "--steps", "3", "--warmup", "1", "--eval-tokens", "2000", "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "perfect data-parallel scaling" in p.stdout and "MFU" in p.stdout
    r = json.loads(out.read_text())
    assert r["device"]["type"] == "cpu" and r["torch"] and r["date"] and r["config"]["num_layers"] == 3
    for path, v in positive_numbers({k: r[k] for k in ("train", "eval", "export")}):
        assert v > 0, path

    cfg = tiny_config()
    flops = bench.train_flops(tg.GPT(cfg), cfg.train_seq_len, cfg.train_batch_tokens)
    for key in ("recur", "no_recur"):
        t = r["train"][key]
        assert len(t["step_times_ms"]) == 3 and t["step_ms"] == pytest.approx(statistics.median(t["step_times_ms"]))
        assert t["tokens_per_s"] == pytest.approx(cfg.train_batch_tokens / (t["step_ms"] / 1000))
        assert t["step_ms_8gpu"] == pytest.approx(t["step_ms"] / 8) and t["grad_accum"] == 8
        assert t["attention"] == "sdpa"   # CPU; the GPU JSON says whether FA3 ran
        assert t["tflops"] == pytest.approx(t["flop_per_step"] / (t["step_ms"] / 1000) / 1e12)
        assert t["mfu"] is None    # no meaningful peak on a CPU
    assert r["train"]["recur"]["flop_per_step"] == flops["flop_per_step"]
    assert r["train"]["no_recur"]["passes"] == r["train"]["recur"]["passes"] - 1
    assert r["train"]["no_recur"]["flop_per_step"] < r["train"]["recur"]["flop_per_step"]

    e = r["eval"]["sliding"]
    assert e["slice_tokens"] == 2000 and e["scored_tokens"] == 1999
    assert e["windows"] == len(tg.build_windows(2000, cfg.eval_seq_len, cfg.eval_stride))
    assert e["tokens_per_s"] == pytest.approx(e["scored_tokens"] / e["seconds"])
    assert e["full_val_windows"] == bench.count_windows(62_021_846, cfg.eval_seq_len, cfg.eval_stride)
    assert e["projected_full_val_s_8gpu"] == pytest.approx(e["seconds"] / e["windows"] * e["full_val_windows"] / 8)

    slot = r["eval"]["slot"]   # SLOT is on by default: its row is the submission's real eval cost
    assert slot["slot"]["steps"] == tg.Config().slot_steps and slot["scored_tokens"] == 1999
    assert slot["seconds"] > 0 and slot["val_bpb"] != e["val_bpb"]

    both = r["eval"]["slot_ttt"]   # TTT on (with SLOT): its seconds over SLOT's, per trained chunk, for the full val
    assert both["ttt"]["epochs"] == 1 and both["ttt_chunks_trained"] == 3 and both["val_bpb"] != slot["val_bpb"]
    assert both["ttt_s_per_chunk"] == pytest.approx(max(0.0, both["seconds"] - slot["seconds"]) / 3)
    assert both["full_val_ttt_chunks"] == -(-62_021_846 // 600) - 1
    assert both["projected_full_val_s_8gpu"] == pytest.approx(
        (slot["seconds"] / slot["windows"] * slot["full_val_windows"] + both["ttt_s_per_chunk"] * both["full_val_ttt_chunks"]) / 8)
    assert "TTT seconds per chunk" in p.stdout

    x = r["export"]
    assert x["artifact_bytes"] == x["compressed_bytes"][x["compressor"]] == min(x["compressed_bytes"].values())
    assert x["code_bytes"] == len((ROOT / "train_gpt.py").read_bytes())
    assert x["total_submission_bytes"] == x["code_bytes"] + x["artifact_bytes"] and x["fits"]


def test_bench_measures_ttt_without_slot(tiny_data, tmp_path):
    data, tok = tiny_data
    out = tmp_path / "bench.json"
    env = script_env(data, tok, tmp_path / "logs", SLOT_STEPS="0", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="600")
    cmd = [sys.executable, str(BENCH), "--sections", "eval", "--eval-tokens", "2000", "--out", str(out)]
    p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    e = json.loads(out.read_text())["eval"]
    assert set(e) == {"sliding", "ttt"} and e["ttt"]["slot"] is None and e["ttt"]["ttt_chunks_trained"] == 3

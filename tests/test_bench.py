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
    before RECUR_START_FRAC (recur_on False) the same model runs 11 passes, 11/13 of its block work."""
    cfg = tg.config_from_env({"RECUR_LAYERS": "4,5"})[0]
    with torch.device("meta"):   # shapes only: the orthogonal init of the real model takes seconds on a busy CPU
        model = tg.GPT(cfg)
    f = bench.train_flops(model, cfg.train_seq_len, cfg.train_batch_tokens)
    assert f["passes"] == 13 and cfg.train_batch_tokens == 786_432
    assert f["flop_per_step"] == pytest.approx(2.1e14, rel=0.05)
    assert 6 * 30e6 < f["matmul_flop_per_token"] < 6 * 32e6    # "6 x 31M matmul parameters" (ANCHORS.md)
    model.recur_on = False
    g = bench.train_flops(model, cfg.train_seq_len, cfg.train_batch_tokens)
    assert g["passes"] == 11 and g["weights_body"] * 13 == f["weights_body"] * 11
    assert g["weights_head"] == f["weights_head"] and g["attention_flop_per_token"] * 13 == f["attention_flop_per_token"] * 11


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


def run_bench(tmp_path, env, *args) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(BENCH), *args, "--out", str(out)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    return p, json.loads(out.read_text()) if out.exists() else {}


def test_bench_runs_every_section_on_cpu(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="600")
    p, r = run_bench(tmp_path, env, "--steps", "3", "--warmup", "1", "--eval-tokens", "2000")
    assert p.returncode == 0, p.stderr
    assert "the optimizer step's ms, not divided" in p.stdout and "MFU" in p.stdout and "recurrence cost" in p.stdout
    assert r["device"]["type"] == "cpu" and r["torch"] and r["date"] and r["config"]["num_layers"] == 3
    assert r["complete"] and r["sections_done"] == ["train", "export", "eval"] and "error" not in r
    assert r["compiled"] is False and r["amp"] is None    # a CPU's defaults: eager, float32
    for path, v in positive_numbers({k: r[k] for k in ("train", "eval", "export")}):
        assert v > 0 or path == ".train.recur_cost_pct", path

    cfg = tiny_config()
    w = r["train"]["compile_warmup"]   # one warm-up over every switch state, timed apart from the steps
    assert w["steps"] == 3 and w["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"] and w["seconds"] > 0
    assert set(r["train"]) == {"compile_warmup", "traffic_8gpu", "recur_off", "recur_on", "recur_cost_pct"}
    for key in ("recur_off", "recur_on"):
        t = r["train"][key]
        assert t["recur_on"] == (key == "recur_on")
        assert len(t["step_times_ms"]) == 3 and t["step_ms"] == pytest.approx(t["fwd_bwd_ms"] + t["optimizer_ms"])
        assert t["settle_step_ms"] > 0 and len(t["losses"]) == 3
        assert t["tokens_per_s"] == pytest.approx(cfg.train_batch_tokens / (t["step_ms"] / 1000))
        # 8 GPUs: each runs one of the 8 micro-batches, but the optimizer step and the communication are paid once
        comm_ms = 1000 * r["train"]["traffic_8gpu"]["bytes_after"] / (bench.COMM_GBPS * 1e9)
        assert t["comm_ms_8gpu"] == pytest.approx(comm_ms) and t["grad_accum"] == 8
        assert t["step_ms_8gpu"] == pytest.approx(t["fwd_bwd_ms"] / 8 + t["optimizer_ms"] + comm_ms)
        assert t["attention"] == "sdpa"   # CPU; the GPU JSON says whether FA3 ran
        assert t["tflops"] == pytest.approx(t["flop_per_step"] / (t["step_ms"] / 1000) / 1e12)
        assert t["mfu"] is None    # no meaningful peak on a CPU
    on, off = r["train"]["recur_on"], r["train"]["recur_off"]
    assert on["flop_per_step"] == bench.train_flops(tg.GPT(cfg), cfg.train_seq_len, cfg.train_batch_tokens)["flop_per_step"]
    assert off["passes"] == on["passes"] - 1 and off["params"] == on["params"]   # one model, two states
    assert off["flop_per_step"] < on["flop_per_step"]
    assert r["train"]["recur_cost_pct"] == pytest.approx(100 * (on["step_ms"] / off["step_ms"] - 1))

    e = r["eval"]["sliding"]
    assert e["slice_tokens"] == 2000 and e["scored_tokens"] == 1999
    assert e["windows"] == len(tg.build_windows(2000, cfg.eval_seq_len, cfg.eval_stride))
    assert e["tokens_per_s"] == pytest.approx(e["scored_tokens"] / e["seconds"])
    assert e["full_val_windows"] == bench.count_windows(62_021_846, cfg.eval_seq_len, cfg.eval_stride)
    assert e["projected_full_val_s_8gpu"] == pytest.approx(e["seconds"] / e["windows"] * e["full_val_windows"] / 8)

    slot = r["eval"]["slot"]   # SLOT is on by default: its row is the submission's real eval cost
    assert slot["slot"]["steps"] == tg.Config().slot_steps and slot["scored_tokens"] == 1999
    assert slot["seconds"] > 0 and slot["val_bpb"] != e["val_bpb"]

    both = r["eval"]["slot_ttt"]   # TTT on (with SLOT): its own seconds per trained chunk, for the full val
    assert both["ttt"]["epochs"] == 1 and both["ttt_chunks_trained"] == 3 and both["val_bpb"] != slot["val_bpb"]
    assert 0 < both["ttt_s_per_chunk"] < both["seconds"] / 3   # timed around the TTT steps, a part of the whole
    assert both["full_val_ttt_chunks"] == -(-62_021_846 // 600) - 1
    assert both["projected_full_val_s_8gpu"] == pytest.approx(
        (slot["seconds"] / slot["windows"] * slot["full_val_windows"] + both["ttt_s_per_chunk"] * both["full_val_ttt_chunks"]) / 8)
    assert "TTT seconds per chunk" in p.stdout

    x = r["export"]
    assert x["artifact_bytes"] == x["compressed_bytes"][x["compressor"]] == min(x["compressed_bytes"].values())
    assert x["code_bytes"] == tg.shipped_code_bytes((ROOT / "train_gpt.py").read_text(encoding="utf-8"))   # the shipped wrapper
    assert x["total_submission_bytes"] == x["code_bytes"] + x["artifact_bytes"] and x["fits"]


def test_bench_measures_ttt_without_slot(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", SLOT_STEPS="0", TTT_EPOCHS="1", TTT_CHUNK_TOKENS="600")
    p, r = run_bench(tmp_path, env, "--sections", "eval", "--eval-tokens", "2000")
    assert p.returncode == 0, p.stderr
    e = r["eval"]
    assert set(e) == {"sliding", "ttt"} and e["ttt"]["slot"] is None and e["ttt"]["ttt_chunks_trained"] == 3
    assert r["sections_done"] == ["eval"] and "train" not in r


def test_bench_keeps_the_sections_done_when_a_later_one_fails(tiny_data, tmp_path):
    """The JSON is rewritten after each section: an eval that stops (here a slice too short for one window; on the GPU
    a time limit) leaves the export already measured on disk, with the error and complete: false."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs")
    p, r = run_bench(tmp_path, env, "--sections", "export,eval", "--eval-tokens", "20")
    assert p.returncode == 1 and "EVAL_SEQ_LEN" in p.stderr
    assert r["sections_done"] == ["export"] and r["complete"] is False and "EVAL_SEQ_LEN" in r["error"]
    assert r["export"]["artifact_bytes"] > 0 and "eval" not in r


def test_bench_runs_the_gpu_graphs_on_cpu(tiny_data, tmp_path):
    """COMPILE=1 AUTOCAST=bf16 reach the bench (start_run with the config): the warm-up compiles every switch state,
    and both recurrence states then step without recompiling (TORCH_LOGS=recompiles after the warm-up line)."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", COMPILE="1", AUTOCAST="bf16", TORCH_LOGS="recompiles")
    p = subprocess.run([sys.executable, str(BENCH), "--sections", "train", "--steps", "2", "--warmup", "1",
                        "--out", str(tmp_path / "bench.json")], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["compiled"] is True and r["amp"] == "bfloat16" and r["sections_done"] == ["train"]
    assert r["train"]["compile_warmup"]["states"] == ["recur0_qat0", "recur1_qat0", "recur1_qat1"]
    before, after = p.stdout.split("compile_warmup steps:", 1)
    assert "Recompiling function forward" in before, "the warm-up compiled the second and third state"
    assert "Recompiling function" not in after, after[:3000]


def test_the_sharded_step_sends_fewer_bytes_on_8_gpus_than_ddp_did():
    """The default 11 x 512 model on 8 ranks: DDP's float32 all-reduce plus the old Muon's bf16 all-reduce, against
    the banks' bf16 reduce-scatter and all-gather (padded) plus the float32 all-reduce of the other gradients."""
    model = tg.GPT(tg.Config())
    t = bench.step_traffic(model, tg.Config())
    n_muon = sum(p.numel() for p in model.parameters() if p.label == "matrix")
    assert t["muon_weights"] == n_muon and t["muon_weights_padded"] >= n_muon
    assert t["bytes_after"] < 0.6 * t["bytes_before"], t
    print(f"bytes per rank per step on 8 GPUs: {t}")


def test_bench_measures_the_document_modes(tiny_data, tmp_path):
    """--eval-modes documents: the five document modes in order, each with its units of work, the seconds per unit
    of the part it adds, and a full-val projection; the phases mode trains on half of the slice's documents."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", LORA_RANK="4", LORA_BATCH="4", SLOT_STEPS="2", PHASE_COUNT="1",
                     PHASE_TOKENS="64", EVAL_BATCH_WINDOWS="4")
    p, r = run_bench(tmp_path, env, "--sections", "eval", "--eval-tokens", "1500", "--eval-modes", "documents")
    assert p.returncode == 0, p.stderr
    e = r["eval"]
    assert list(e) == list(bench.DOC_MODES)
    plain, slot, lora = e["document"], e["document_slot"], e["document_lora"]
    assert all(x["scored_tokens"] == 1499 and x["mode"] == "document" for x in e.values())
    assert plain["rows"] == 4 and plain["units"]["fwd_cols"] > 0 and plain["s_per_fwd_col"] > 0
    assert slot["slot"]["steps"] == 2 and slot["units"]["slot_cols"] > 0 and "s_per_slot_col_step" in slot
    assert lora["lora"]["rank"] == 4 and lora["units"]["lora_cols"] > 0 and "s_per_lora_col" in lora
    assert lora["val_bpb"] != plain["val_bpb"] and slot["val_bpb"] != plain["val_bpb"]
    ph = e["document_lora_slot_phases"]
    assert ph["phases"]["docs"] == ph["docs"] // 2 and ph["phase_seconds"] > 0 and ph["s_per_phase_step"] > 0
    assert ph["full_val_phase_steps"] > ph["phase_steps"]
    for x in e.values():
        assert x["projected_full_val_s_8gpu"] == pytest.approx(sum(x["projected_parts_s_8gpu"].values()))
        assert x["full_val_docs"] > x["docs"]
    assert "seconds per unit" in p.stdout and "document_lora_slot_phases" in p.stdout


def test_bench_document_mode_needs_its_parts(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", LORA_RANK="0")
    p, r = run_bench(tmp_path, env, "--sections", "eval", "--eval-tokens", "1500", "--eval-modes", "document_lora")
    assert p.returncode == 1 and "needs lora" in p.stderr

"""GPTQ at export: the Hessians it is calibrated with, the error it saves, the time it is given, the data it may
read, and what every rank sees when the export fails."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import train_gpt as T
from helpers import ROOT, TINY_ENV, parse_log, run_script, script_env, tiny_model, write_shard


def test_hessians_are_the_inputs_gram_matrices():
    model = tiny_model(seed=3)        # layer 1 runs twice (RECUR_LAYERS=1)
    x = torch.randint(2, 320, (2, 24))
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, m in model.named_modules() if isinstance(m, T.QLinear)]
    h = model.hidden(x)
    for hook in hooks:
        hook.remove()
    H, tokens = T.collect_hessians(model, [(x, None)], T.Run())
    assert tokens == x.numel()
    gram = lambda xs: sum(t.reshape(-1, t.size(-1)).T @ t.reshape(-1, t.size(-1)) for t in xs)
    for name, xs in seen.items():
        torch.testing.assert_close(H[f"{name}.weight"], gram(xs).float(), rtol=1e-5, atol=1e-5)
    assert len(seen["blocks.1.attn.c_q"]) == 2, "the recurrent layer's two passes both count"
    assert H["blocks.0.attn.c_k.weight"] is H["blocks.0.attn.c_q.weight"], "q, k and v read one input: one Hessian"
    torch.testing.assert_close(H["tok_emb.weight"], gram([T.rms_norm(h)]).float(), rtol=1e-5, atol=1e-5)


def test_hessians_are_float32_under_bf16_autocast():
    """AUTOCAST=bf16 (the GPU's setting): the layer inputs are bf16, but X^T X must be summed in float32. A bf16
    matmul keeps 8 bits of mantissa (relative error ~4e-3 per product sum); the float64 reference of the same bf16
    inputs must agree to float32 accuracy over several batches."""
    model = tiny_model(seed=5, dtype=torch.float32)
    run = T.Run(amp=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(2, 320, (8, 32), generator=g), None) for _ in range(4)]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, n=n: seen.setdefault(n, []).append(inp[0].detach()))
             for n, m in model.named_modules() if isinstance(m, T.QLinear)]
    for x, _ in batches:
        with run.autocast():
            model.hidden(x)
    for hook in hooks:
        hook.remove()
    H, _ = T.collect_hessians(model, batches, run)
    assert seen["blocks.2.mlp.proj"][0].dtype == torch.bfloat16, "the inputs are bf16 under autocast"
    for name, xs in seen.items():
        ref = sum(t.reshape(-1, t.size(-1)).double().T @ t.reshape(-1, t.size(-1)).double() for t in xs)
        got = H[f"{name}.weight"]
        assert got.dtype == torch.float32
        err = float((got.double() - ref).abs().max() / ref.abs().max())
        assert err < 1e-5, (name, err)


def test_gptq_export_beats_round_to_nearest_on_the_models_own_inputs():
    """Every int6 matrix and the head: output error on held-out activations, GPTQ vs round to nearest, same grid."""
    model = tiny_model(seed=4, dtype=torch.float32, scale=0.1)
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randint(2, 320, (4, 32), generator=g), None) for _ in range(4)]
    H, _ = T.collect_hessians(model, calib, T.Run())
    H_held, _ = T.collect_hessians(model, [(torch.randint(2, 320, (8, 32), generator=g), None)], T.Run())
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    labels = T.param_labels(model)
    ratios = []
    for name, w in state.items():
        kind = T.PARAM_TABLE[labels[name]][3]
        if name not in H or kind not in ("int6", "int8"):
            continue
        err = lambda hess: (lambda q, s: float(torch.trace((w - q.float() * s.float()[:, None]) @ H_held[name]
                                                           @ (w - q.float() * s.float()[:, None]).T)))(*T.quantize_tensor(w, kind, T.QuantSpec(), hess))
        ratios.append(err(H[name]) / err(None))    # GPTQ with the Hessian / round to nearest on the same grid
    assert len(ratios) >= 10 and float(np.median(ratios)) < 0.9, ratios


def test_reserved_time_ends_training_early(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="res", PHASES="train,export", ITERATIONS="100000",
                     MAX_WALLCLOCK_SECONDS="3", GPTQ_RESERVE_SECONDS="1.5")
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = parse_log(tmp_path / "logs" / "res.txt")
    step_ms = float(lines["train_done"]["step_avg"].removesuffix("ms"))
    train_ms = float(lines["train_done"]["train_time"].removesuffix("ms"))
    assert train_ms <= 1500 + 2 * step_ms, "training must stop by the cap less the reserve"
    calib = lines["gptq_calib"]
    assert int(calib["calib_batches"]) > 0 and float(calib["train_time_with_calib"].removesuffix("ms")) <= 3000
    assert lines["artifact"]["quantizer"] == "gptq"


def test_validation_tokens_never_reach_training_or_calibration(tiny_data, tmp_path, monkeypatch):
    """Val is made of a sentinel id that the train shards never contain; every forward of the training phase
    (warm-up, steps, calibration) is watched for it."""
    data0, tok = tiny_data
    data = tmp_path / "data"
    for f in data0.glob("fineweb_train_*.bin"):
        train = np.fromfile(f, dtype="<u2", offset=1024)
        write_shard(data / f.name, np.where(train == 300, 299, train))   # id 300 now only in val
    write_shard(data / "fineweb_val_000000.bin", [1] + [300] * 999)
    cfg, _ = T.config_from_env(dict(TINY_ENV, DATA_PATH=str(data), TOKENIZER_PATH=str(tok), ITERATIONS="3",
                                    VAL_LOSS_EVERY="0", GPTQ_CALIB_BATCHES="4"))
    seen = []
    original = T.GPT.hidden
    monkeypatch.setattr(T.GPT, "hidden", lambda self, idx: seen.append(bool((idx == 300).any())) or original(self, idx))
    state, labels, calib, _ = T.train_phase(cfg, T.Run(), None)
    assert calib is not None and len(calib.hessians) > 10 and len(seen) >= 3 * 8 + 2 and not any(seen)


FAILING_EXPORT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    import train_gpt as T
    run = T.start_run(os.environ)
    def export():
        if run.rank == 0:
            raise T.RunError("disk full while writing the artifact")
        return 1
    t0 = time.perf_counter()
    try:
        run.main_only(export)
    except T.RunError as e:
        print(f"rank {{run.rank}} got: {{e}} after {{time.perf_counter() - t0:.1f}}s", flush=True)
    dist.destroy_process_group()
""")


def test_a_rank0_export_failure_reaches_every_rank_at_once(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_EXPORT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "TMPDIR", "VIRTUAL_ENV")}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    for rank in (0, 1):
        assert f"rank {rank} got: disk full while writing the artifact" in out, out[-2000:]
    waited = float(out.split("rank 1 got: disk full while writing the artifact after ")[1].split("s")[0])
    assert waited < 20, "rank 1 must not wait for a timeout"


def test_prequant_score_is_logged_before_the_final_one(tiny_data, tmp_path):
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="pq", EVAL_PREQUANT="1", SLOT_STEPS="0", TTT_EPOCHS="0",
                     EVAL_MODE="stream")   # prequant_exact is the plain sliding window: compared with the same
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    text = (tmp_path / "logs" / "pq.txt").read_text().split("=" * 100)[1]
    assert text.index("prequant_exact val_loss:") < text.index("final_sliding_window_exact")
    lines = parse_log(tmp_path / "logs" / "pq.txt")
    pre, post = lines["prequant_exact"], lines["final_sliding_window_exact"]
    assert pre["scored_tokens"] == post["scored_tokens"] and float(pre["val_bpb"]) != float(post["val_bpb"])


def test_the_default_reserve_is_measured_in_the_warm_up(tiny_data, tmp_path):
    """GPTQ_RESERVE_SECONDS=0 (the default): the warm-up times one calibration batch (its second run) and the cap
    keeps RESERVE_MARGIN x batches per rank x that time; training stops by the cap less it, and the calibration's
    own time is logged beside it."""
    data, tok = tiny_data
    env = script_env(data, tok, tmp_path / "logs", RUN_ID="measured", PHASES="train,export", ITERATIONS="100000",
                     MAX_WALLCLOCK_SECONDS="4", GPTQ_RESERVE_SECONDS="0", GPTQ_CALIB_BATCHES="100")
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = parse_log(tmp_path / "logs" / "measured.txt")
    ms = lambda v: float(v.removesuffix("ms"))  # noqa: E731
    res = lines["gptq_reserve"]
    assert int(res["batches_per_rank"]) == 100 and float(res["margin"]) == T.RESERVE_MARGIN
    reserve = ms(res["reserve"])
    # the log rounds measured_batch to whole ms: +-0.5 ms x 100 batches x the margin
    assert reserve == pytest.approx(T.RESERVE_MARGIN * 100 * ms(res["measured_batch"]), abs=T.RESERVE_MARGIN * 100 * 0.5)
    step_ms = ms(lines["train_done"]["step_avg"])
    assert reserve > 3 * step_ms, "100 batches: a reserve the cap check below can tell from the steps' own slack"
    assert ms(lines["train_done"]["train_time"]) <= 4000 - reserve + 2 * step_ms, "the cap less the measured reserve"
    calib = lines["gptq_calib"]
    assert int(calib["calib_batches"]) > 0 and ms(calib["train_time_with_calib"]) <= 4000

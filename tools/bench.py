"""Speed benchmark for train_gpt.py: training step time and MFU, sliding-window eval throughput, export time and size.

It imports train_gpt and times its real code paths (GPT, build_optimizers, TrainLoader, compile_warmup, train_step,
EMA, evaluate, pack_state, pack_artifact), in one process on one device. The model settings come from the same
environment variables as train_gpt.py, COMPILE and AUTOCAST included (COMPILE=1 AUTOCAST=bf16 on a CPU runs the GPU's
graphs); flags only choose what to measure. A table goes to stdout and every figure, with the config, device and
versions, to logs/bench/<name>.json (LOG_DIR/bench), rewritten after each section, so a run cut short keeps what
it measured.

Training: one model, one compile_warmup (it compiles every switch state the run passes through, and its seconds are
reported apart as compile time), then the step time in both recurrence states of that model: "recur_off" (before
RECUR_START_FRAC, the second passes skipped) and "recur_on" (after it). QAT is off in both, as for most of a run.

    # CPU, tiny model (what CI runs)
    VOCAB_SIZE=320 NUM_LAYERS=3 MODEL_DIM=32 ... python tools/bench.py --steps 3
    # one GPU, the real configuration on the proxy data
    DATA_PATH=<shards folder> TOKENIZER_PATH=<its .model> python tools/bench.py

FLOP model, per trained token:
    6 x (matmul weights, counting each pass of the layer schedule that runs, + tied LM head V*d + bigram and
         value-embedding projections)
  + 6 x model_dim x seq_len x passes   (causal QK^T and AV: d*T/2 multiply-adds each per token on average, x3 fwd+bwd)
Element-wise work, norms, RoPE, the Muon Newton-Schulz iterations and the optimizers are not counted.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt as tg  # noqa: E402
import eval_budget as eb  # noqa: E402

VAL_TOKENS_FULL = 62_021_846     # official FineWeb val stream: the target of the eval projection
PROJECTION_GPUS = tg.REFERENCE_GPUS
COMM_GBPS = 300                  # assumed NCCL bus bandwidth per H100 on NVLink (8 x H100 SXM); only the projection uses it
ASSUMPTIONS = {
    "train_8gpu": f"ms/step on {PROJECTION_GPUS} GPUs = forward+backward ms of the {tg.REFERENCE_GPUS} micro-batches / "
                  f"{PROJECTION_GPUS} (each GPU runs one) + the optimizer step's ms, not divided (every rank still "
                  f"applies every update; sharding only splits the Newton-Schulz) + the bytes each rank sends per step "
                  f"at {COMM_GBPS} GB/s (NCCL bus bandwidth on NVLink H100, an assumption; no overlap counted)",
    "eval_8gpu": f"full val ({VAL_TOKENS_FULL:,} tokens) time = measured seconds per window x windows of the full "
                 f"stream / {PROJECTION_GPUS} GPUs: every window has the same width, windows split evenly, no "
                 f"communication cost; compilation and model loading excluded",
    "ttt_8gpu": "with TTT: the seconds of its steps (timed inside evaluate), per trained chunk, x the full val's chunks / "
                f"{PROJECTION_GPUS} GPUs (each chunk's sequences split evenly; optimistic: each rank still runs the whole SGD "
                "step and clipping, and the per-epoch gradient all-reduce and the TTT compilation are not counted)",
    "flop_model": "6 x (matmul weights x passes + tied head V*d + bigram and value-embedding projections) + 6 x d x seq_len x passes "
                  "per trained token; eval counts the forward third (2x) over every window token, the head only "
                  "at scored positions",
}


# ==================================================================================================
# FLOP model
# ==================================================================================================

def active_passes(model: tg.GPT) -> list:
    """The passes the forward runs in the model's recurrence state: all of them, or the first passes alone before
    RECUR_START_FRAC (model.recur_on False)."""
    return [p for p in model.schedule if model.recur_on or p.repeat < 0]


def matmul_weights(model: tg.GPT) -> dict[str, int]:
    """Weights each token multiplies through: the QLinears of the block of each pass that runs, tied head, and the
    projections of the bigram and value embeddings."""
    per_layer = [sum(m.weight.numel() for m in b.modules() if isinstance(m, tg.QLinear)) for b in model.blocks]
    return {"body": sum(per_layer[p.layer] for p in active_passes(model)),
            "head": model.tok_emb.weight.numel(),
            "bigram": model.bigram.proj.weight.numel() if model.bigram is not None and model.bigram.proj is not None else 0,
            "value_embed": model.value_embed.proj.weight.numel() if model.value_embed is not None else 0}


def train_flops(model: tg.GPT, seq_len: int, batch_tokens: int) -> dict[str, float]:
    w = matmul_weights(model)
    passes, d = len(active_passes(model)), model.tok_emb.weight.size(1)
    matmul = 6 * sum(w.values())
    attention = 6 * d * seq_len * passes      # fwd: QK^T and AV cost d*T/2 MACs each per token = 2*d*T FLOP; x3 fwd+bwd
    return {"passes": passes, "matmul_weights_per_token": sum(w.values()), **{f"weights_{k}": v for k, v in w.items()},
            "matmul_flop_per_token": matmul, "attention_flop_per_token": attention,
            "flop_per_token": matmul + attention, "flop_per_step": (matmul + attention) * batch_tokens}


def eval_flops(model: tg.GPT, windows) -> float:
    """Forward FLOP of evaluate(): the body runs on every window token, the head only on scored targets."""
    w = matmul_weights(model)
    passes, d = len(active_passes(model)), model.tok_emb.weight.size(1)
    width = windows[:, 1] - windows[:, 0]
    scored = windows[:, 1] - windows[:, 2] + 1
    body = width * (2 * (w["body"] + w["bigram"] + w["value_embed"]) + 2 * d * width * passes)   # attention: 2*d*T per token
    return float((body + scored * 2 * w["head"]).sum())


def count_windows(n_tokens: int, seq_len: int, stride: int) -> int:
    """len(build_windows(...)) without building 1M windows in Python: windows start at 0, stride, ... until one reaches
    the last target (the test checks this against build_windows)."""
    return 1 + max(0, -(-(n_tokens - 1 - seq_len) // stride))


# ==================================================================================================
# Measurements
# ==================================================================================================

def reset_peak_memory(run: tg.Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)


def peak_memory(run: tg.Run) -> dict:
    """CUDA: bytes allocated by tensors since the last reset. CPU: the process's peak resident set (all of it, ever)."""
    if run.device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(run.device), "memory_kind": "cuda_max_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": rss if sys.platform == "darwin" else rss * 1024, "memory_kind": "process_max_rss"}


def rates(flop: float | None, seconds: float, peak: float | None) -> dict:
    if flop is None:
        return {"tflops": None, "mfu": None}
    achieved = flop / seconds
    return {"tflops": achieved / 1e12, "mfu": achieved / peak if peak else None}


RECUR_STATES = {"recur_off": False, "recur_on": True}   # train's keys: the model before and after RECUR_START_FRAC


def timed_compile_warmup(model: tg.GPT, opts, cfg: tg.Config, run: tg.Run, grad_accum: int, local_tokens: int):
    """tg.compile_warmup, timed. Returns (the training forward, {"seconds", "steps", "states", "compiled", "amp"})."""
    run.sync()
    t0 = time.perf_counter()
    fwd, _ = tg.compile_warmup(model, opts, cfg, run, grad_accum, local_tokens)
    run.sync()
    plan = tg.warmup_plan(cfg)
    return fwd, {"seconds": time.perf_counter() - t0,
                 "steps": max(cfg.warmup_steps, len(plan)) if cfg.warmup_steps else 0,
                 "states": [tg.plan_label(cfg, n, s) for n, s in plan] if cfg.warmup_steps else [],
                 "compiled": run.compiled, "amp": str(run.amp).removeprefix("torch.") if run.amp else None}


def time_steps(fwd, opts, loader: tg.TrainLoader, ema: tg.EMA, cfg: tg.Config, run: tg.Run, steps: range):
    """Per optimizer step, as train_phase's loop runs it (tg.train_step's two halves, the EMA update, the loss read
    back): (forward+backward seconds, optimizer seconds incl. EMA, loss). The batches are read before the timer
    starts (the real loop reads the next step's while the device works)."""
    grad_accum = tg.batch_split(cfg, run)[0]
    fb, opt, losses = [], [], []
    for step in steps:
        batches = loader.next_step(grad_accum)
        run.sync()
        t0 = time.perf_counter()
        tg.set_schedule(opts, cfg, step, 0.0)
        total = torch.zeros((), device=run.device)
        for x, y in batches:   # tg.train_step's accumulation, written out so that its two halves time apart
            with run.autocast():
                loss = fwd(x, y)
            (loss / len(batches)).backward()
            total += loss.detach()
        run.sync()
        t1 = time.perf_counter()
        tg.optimizer_step(opts, run, cfg.grad_clip_norm)
        ema.update()
        losses.append(float(total / len(batches)))   # the real loop's one host sync per step
        run.sync()
        fb.append(t1 - t0)
        opt.append(time.perf_counter() - t1)
    return fb, opt, losses


def step_traffic(model: tg.GPT, cfg: tg.Config, world: int = PROJECTION_GPUS) -> dict:
    """Bytes each rank sends per training step on `world` GPUs (ring collectives, compute dtype bf16), before (DDP's
    float32 all-reduce of every gradient + the round-robin Muon's bf16 all-reduce of every update) and now (each
    Muon bank's bf16 reduce-scatter and all-gather, padded to a multiple of world, and one float32 all-reduce of
    the other gradients)."""
    ring = (world - 1) / world
    muon = [p for p in model.parameters() if tg.PARAM_TABLE[p.label][0] == "muon"]
    small = sum(p.numel() for p in model.parameters() if tg.PARAM_TABLE[p.label][0] != "muon")
    banks: dict[tuple, int] = {}
    for p in muon:
        banks[tuple(p.shape)] = banks.get(tuple(p.shape), 0) + 1
    padded = sum(-(-n // world) * world * math.prod(shape) for shape, n in banks.items())
    n_muon = sum(p.numel() for p in muon)
    before = 2 * ring * 4 * (n_muon + small) + 2 * ring * 2 * n_muon
    after = 2 * ring * 2 * padded + 2 * ring * 4 * small
    return {"world": world, "muon_weights": n_muon, "muon_weights_padded": padded, "other_weights": small,
            "bytes_before": int(before), "bytes_after": int(after)}


def bench_train(cfg: tg.Config, run: tg.Run, steps: int, warmup: int, peak: float | None):
    """Median times of one optimizer step as train_phase runs it on one device (schedule, 8 micro-batches, the
    optimizer step, EMA update, the loss read back), forward+backward and optimizer apart, in each recurrence state
    of one model. One compile_warmup first compiles every switch state (timed apart: compile time is not step
    time) and restores the weights and optimizer state, as in a real run; in each state one more untimed step
    settles the loader and the allocator before the timed ones. Returns (figures, model in the exported state, EMA
    weights)."""
    grad_accum, local_tokens = tg.batch_split(cfg, run)
    model = tg.build_model(cfg, run)
    opts = tg.build_optimizers(model, cfg, run)
    fwd, warm = timed_compile_warmup(model, opts, dataclasses.replace(cfg, warmup_steps=warmup), run, grad_accum,
                                     local_tokens)
    loader, ema = tg.TrainLoader(cfg, run, local_tokens), tg.EMA(model, cfg.ema_decay)
    traffic = step_traffic(model, cfg)
    comm_s = traffic["bytes_after"] / (COMM_GBPS * 1e9)
    out, step = {"compile_warmup": warm, "traffic_8gpu": traffic}, 0
    states = RECUR_STATES if cfg.recur_layers or cfg.loop_layers else {"recur_off": False}   # none: one state
    for key, recur in states.items():
        tg.set_switches(model, cfg, (recur, False))
        reset_peak_memory(run)   # this state's steady-state steps only, not the compiler's own peak
        fb, opt, losses = time_steps(fwd, opts, loader, ema, cfg, run, range(step, step + steps + 1))
        step += steps + 1
        settle, fb, opt, losses = fb[0] + opt[0], fb[1:], opt[1:], losses[1:]
        fb_s, opt_s = statistics.median(fb), statistics.median(opt)
        step_s = fb_s + opt_s
        flops = train_flops(model, cfg.train_seq_len, cfg.train_batch_tokens)
        out[key] = {"recur_on": recur, "recur_layers": list(cfg.recur_layers), "attention": model.blocks[0].attn.backend,
                    "params": sum(p.numel() for p in model.parameters()), "grad_accum": grad_accum,
                    "micro_batch_tokens": local_tokens, "batch_tokens": cfg.train_batch_tokens,
                    "settle_step_ms": 1000 * settle, "timed_steps": steps,
                    "step_times_ms": [1000 * (a + b) for a, b in zip(fb, opt)], "step_ms": 1000 * step_s,
                    "fwd_bwd_ms": 1000 * fb_s, "optimizer_ms": 1000 * opt_s, "comm_ms_8gpu": 1000 * comm_s,
                    "step_ms_8gpu": 1000 * (fb_s / PROJECTION_GPUS + opt_s + comm_s),
                    "tokens_per_s": cfg.train_batch_tokens / step_s, "losses": losses, **flops,
                    **rates(flops["flop_per_step"], step_s, peak), **peak_memory(run)}
        if peak:
            out[key]["step_ms_at_50pct_mfu"] = 1000 * flops["flop_per_step"] / (0.5 * peak)
    if "recur_on" in out and "recur_off" in out:
        out["recur_cost_pct"] = 100 * (out["recur_on"]["step_ms"] / out["recur_off"]["step_ms"] - 1)
    tg.set_switches(model, cfg, (True, False))   # what is exported and evaluated: recurrence on, QAT off
    return out, model, ema.state_dict(model)


def eval_modes(cfg: tg.Config) -> dict[str, tg.Adaptation]:
    """Name -> the Adaptation evaluate() runs: the plain sliding window, SLOT as configured, and TTT (with SLOT
    when it is on) as configured; no deadline: the bench measures the full SLOT_STEPS and TTT_EPOCHS. evaluate()
    compiles its forwards when the run compiles (COMPILE): the warm-up call pays for that, the timed one does not."""
    slot, ttt = tg.Slot.from_config(cfg), tg.Ttt.from_config(cfg)
    modes = {"sliding": tg.Adaptation(), **({"slot": tg.Adaptation(slot=slot)} if slot else {})}
    if ttt:
        modes["slot_ttt" if slot else "ttt"] = tg.Adaptation(slot=slot, ttt=ttt)
    return modes


DOC_MODES = ("document", "document_slot", "document_lora", "document_lora_slot", "document_lora_slot_phases")


def document_modes(cfg: tg.Config, names: list[str], n_docs: int) -> dict[str, tg.Adaptation]:
    """Name -> the document mode's Adaptation, from the Config's SLOT, LoRA and phase settings (no deadline). A mode
    that needs a part the Config turns off (SLOT_STEPS=0, LORA_RANK=0, PHASE_COUNT=0) is an error. Phases: a slice
    holds far fewer documents than PHASE_DOCS, so they train on the first half of the slice's documents."""
    slot, lora = tg.Slot.from_config(cfg), tg.Lora.from_config(cfg)
    phases = tg.Phases.from_config(cfg)
    out = {}
    for name in names:
        need = {"slot": slot, "lora": lora, "phases": phases}
        for part, value in need.items():
            if part in name.split("_") and value is None:
                raise tg.RunError(f"eval mode {name} needs {part}, which the Config turns off")
        ph = None
        if "phases" in name:
            ph = dataclasses.replace(phases, docs=min(phases.docs, max(1, n_docs // 2)))
        out[name] = tg.Adaptation("document", slot if "slot" in name else None, None,
                                  lora if "lora" in name else None, ph)
    return out


def document_projection(name: str, adapt: tg.Adaptation, r: tg.EvalResult, lengths, geo: tg.Geometry, done: dict,
                        world: int = PROJECTION_GPUS) -> dict:
    """Seconds per unit of work of the part this mode adds, from this run and the modes measured before it (the
    order of DOC_MODES): forward columns (rows x width, head included), SLOT column-steps, LoRA columns (forward
    with the adapters' graph + backward + step), phase steps; then the full val on `world` GPUs: the slice's units
    scaled by tokens and split evenly, x the seconds per unit (phase steps: PHASE_DOCS documents, on every rank)."""
    rows = adapt.lora.batch if adapt.lora else geo.batch_windows
    here = eb.document_work(lengths, geo, rows, 1, adapt.phases)["slowest_rank"]
    scoring_s = r.seconds - r.ttt_seconds
    unit = {}
    base = done.get("document")
    if name == "document":
        unit["s_per_fwd_col"] = scoring_s / here["fwd_cols"]
    else:
        unit["s_per_fwd_col"] = base["s_per_fwd_col"] if base else None
    if adapt.lora and not adapt.slot and base:
        unit["s_per_lora_col"] = (scoring_s - base["s_per_fwd_col"] * here["fwd_cols"]) / max(1, here["lora_cols"])
    elif adapt.lora:
        unit["s_per_lora_col"] = done.get("document_lora", {}).get("s_per_lora_col")
    steps = adapt.slot.steps if adapt.slot else 0
    if adapt.slot and not adapt.phases:
        ref = done.get("document_lora" if adapt.lora else "document")
        if ref:
            rest = ref["s_per_fwd_col"] * here["fwd_cols"] + (ref.get("s_per_lora_col") or 0) * here["lora_cols"]
            unit["s_per_slot_col_step"] = (scoring_s - rest) / max(1, here["slot_cols"] * steps)
    elif adapt.slot:
        unit["s_per_slot_col_step"] = done.get("document_lora_slot", {}).get("s_per_slot_col_step")
    # the full val: this slice's units scaled by tokens, split evenly over `world` GPUs (tools/eval_budget.py counts
    # them from the real length distribution, with the balance and the padding)
    scale = VAL_TOKENS_FULL / max(1, int(lengths.sum()) + 1) / world
    slow = {k: v * scale for k, v in here.items()}
    full = {"docs": int(round(len(lengths) * scale * world)), "phase_steps": 0}
    if adapt.phases:
        phase_steps = eb.document_work(lengths, geo, rows, 1, adapt.phases)["phase_steps"]
        unit["phase_steps"] = phase_steps
        unit["s_per_phase_step"] = r.ttt_seconds / max(1, phase_steps)
        # every rank runs every step (PHASE_ROWS padded rows each): PHASE_DOCS documents, at this slice's steps per doc
        full["phase_steps"] = math.ceil(phase_steps * tg.Config.phase_docs / adapt.phases.docs)
    parts = {"scoring": (unit["s_per_fwd_col"] or 0.0) * slow["fwd_cols"],
             "slot": (unit.get("s_per_slot_col_step") or 0.0) * slow["slot_cols"] * steps,
             "lora": (unit.get("s_per_lora_col") or 0.0) * slow["lora_cols"] if adapt.lora else 0.0,
             # every rank runs every phase step on PHASE_ROWS padded rows: not divided by the GPUs
             "phases": (unit.get("s_per_phase_step") or 0.0) * full["phase_steps"]}
    return {"units": here, **unit, "full_val_units_per_gpu": slow, "full_val_phase_steps": full["phase_steps"],
            "full_val_docs": full["docs"], "projected_parts_s_8gpu": parts,
            "projected_full_val_s_8gpu": sum(parts.values())}


def bench_documents(cfg: tg.Config, run: tg.Run, model: tg.GPT, val: torch.Tensor, names: list[str]) -> dict:
    """evaluate() in the document mode on the slice, each mode after a warm-up call on its first documents."""
    tables = tg.eval_byte_tables(cfg)
    geo = tg.Geometry.from_config(cfg)
    spans = tg.document_spans(val)
    lengths = (spans[:, 1] - spans[:, 0]).astype(np.int64)
    out: dict = {}
    for name, adapt in document_modes(cfg, names, len(spans)).items():
        warm = val[:int(spans[min(1, len(spans) - 1), 1]) + 1]
        first = tg.evaluate(model, warm, tables, run, geo, adapt)
        reset_peak_memory(run)
        r = tg.evaluate(model, val, tables, run, geo, adapt)
        out[name] = {"mode": "document", "slice_tokens": len(val), "scored_tokens": r.tokens, "docs": len(spans),
                     "warmup_tokens": len(warm), "warmup_s": first.seconds, "seconds": r.seconds,
                     "phase_seconds": r.ttt_seconds, "tokens_per_s": r.tokens / r.seconds, "val_loss": r.loss,
                     "val_bpb": r.bpb, "rows": adapt.lora.batch if adapt.lora else geo.batch_windows,
                     "slot": dataclasses.asdict(adapt.slot) if adapt.slot else None,
                     "lora": dataclasses.asdict(adapt.lora) if adapt.lora else None,
                     "phases": dataclasses.asdict(adapt.phases) if adapt.phases else None,
                     "full_val_tokens": VAL_TOKENS_FULL,
                     **document_projection(name, adapt, r, lengths, geo, out), **peak_memory(run)}
    model.train()
    return out


def bench_eval(cfg: tg.Config, run: tg.Run, model: tg.GPT, n_tokens: int, peak: float | None,
               modes: list[str] | None = None) -> dict:
    """evaluate() on the first n_tokens of val: a warm-up call, then the timed one. `modes`: "stream" (the sliding
    window, SLOT and TTT as configured) and/or document-mode names (DOC_MODES)."""
    modes = modes or ["stream"]
    val = tg.load_val_tokens(cfg)[:n_tokens]
    docs = [m for m in modes if m != "stream"]
    if "stream" not in modes:
        model.eval()
        return bench_documents(cfg, run, model, val, docs)
    if len(val) <= cfg.eval_seq_len + 1:
        raise tg.RunError(f"the eval slice ({len(val)} tokens) must be longer than EVAL_SEQ_LEN={cfg.eval_seq_len} "
                          f"+ 1, or its windows are narrower than the real ones")
    tables = tg.eval_byte_tables(cfg)
    model.eval()
    if run.compiled:   # as eval_phase: the eval's graphs compile anew, not as recompiles of the training forward's
        torch._dynamo.reset()
    windows = tg.build_windows(len(val), cfg.eval_seq_len, cfg.eval_stride)
    full_windows = count_windows(VAL_TOKENS_FULL, cfg.eval_seq_len, cfg.eval_stride)
    # Compiled, the warm-up runs on the whole slice, so that the timed call meets no shape that was not compiled
    # (dynamic=False). Eager, one batch of windows is enough to settle the allocator.
    warm = val if run.compiled else val[:cfg.eval_seq_len + 1 + cfg.eval_stride * cfg.eval_batch_windows]
    geometry = (tables, run, tg.Geometry.from_config(cfg))
    out = {}
    for name, adapt in eval_modes(cfg).items():
        first = tg.evaluate(model, warm, *geometry, adapt)
        reset_peak_memory(run)
        r = tg.evaluate(model, val, *geometry, adapt)
        # the FLOP model knows the plain forward only; a mode with extra work (SLOT's steps) reports no TFLOP/s
        flop = eval_flops(model, windows) if adapt == tg.Adaptation() else None
        per_window = r.seconds / len(windows)
        ttt = {}
        if adapt.ttt:
            ttt = ttt_projection(adapt.ttt, r, len(val))
            per_window = out["slot" if adapt.slot else "sliding"]["seconds"] / len(windows)
        out[name] = {"slice_tokens": len(val), "scored_tokens": r.tokens, "windows": len(windows),
                     "seq_len": cfg.eval_seq_len, "stride": cfg.eval_stride, "batch_windows": cfg.eval_batch_windows,
                     "warmup_tokens": len(warm), "warmup_s": first.seconds, "seconds": r.seconds,
                     "tokens_per_s": r.tokens / r.seconds, "windows_per_s": len(windows) / r.seconds,
                     "val_loss": r.loss, "val_bpb": r.bpb, "slot": dataclasses.asdict(adapt.slot) if adapt.slot else None,
                     "full_val_tokens": VAL_TOKENS_FULL, "full_val_windows": full_windows,
                     "projected_full_val_s_1gpu": per_window * full_windows + ttt.get("full_val_ttt_s_1gpu", 0.0),
                     "projected_full_val_s_8gpu": (per_window * full_windows + ttt.get("full_val_ttt_s_1gpu", 0.0)) / PROJECTION_GPUS,
                     **ttt, "flop": flop, **rates(flop, r.seconds, peak), **peak_memory(run)}
    if docs:
        out.update(bench_documents(cfg, run, model, val, docs))
    model.train()
    return out


def ttt_projection(ttt: tg.Ttt, r: tg.EvalResult, n_tokens: int) -> dict:
    """TTT's share of an evaluation: the seconds evaluate() timed around its TTT steps, per trained chunk, and for
    the full val's chunks (each chunk's training split across the GPUs like its windows)."""
    need_chunks = -(-VAL_TOKENS_FULL // ttt.chunk_tokens) - 1
    if r.ttt_chunks_trained == 0:
        raise tg.RunError(f"the eval slice ({n_tokens} tokens) holds one TTT chunk ({ttt.chunk_tokens} tokens), so "
                          f"nothing trains: raise --eval-tokens above TTT_CHUNK_TOKENS")
    per_chunk = r.ttt_seconds / r.ttt_chunks_trained
    return {"ttt": dataclasses.asdict(ttt), "ttt_chunks_trained": r.ttt_chunks_trained, "ttt_s_per_chunk": per_chunk,
            "full_val_ttt_chunks": need_chunks, "full_val_ttt_s_1gpu": per_chunk * need_chunks}


def bench_calibration(cfg: tg.Config, run: tg.Run, model: tg.GPT, state: dict[str, torch.Tensor]) -> tuple[dict, float]:
    """GPTQ's Hessians from GPTQ_CALIB_BATCHES training micro-batches with the EMA weights, timed, as after training
    (one device: all batches on it). Returns (Hessians, seconds)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(state[name].to(p.device))
    model.eval()
    loader = tg.TrainLoader(cfg, run, tg.batch_split(cfg, run)[1])
    run.sync()
    t0 = time.perf_counter()
    hessians, _ = tg.collect_hessians(model, (loader.next() for _ in range(cfg.gptq_calib_batches)), run)
    run.sync()
    return hessians, time.perf_counter() - t0


def bench_export(cfg: tg.Config, state: dict[str, torch.Tensor], labels: dict[str, str], weights: str,
                 hessians: dict | None = None, calib_s: float | None = None) -> dict:
    """pack_state (quantize: GPTQ where there are Hessians) and pack_artifact (every compressor, keep the smallest),
    timed apart, as in export_phase."""
    t0 = time.perf_counter()
    payload = tg.pack_state(state, labels, {f: getattr(cfg, f) for f in tg.MODEL_FIELDS}, tg.QuantSpec.from_config(cfg), hessians)
    t1 = time.perf_counter()
    blob, compressor, sizes = tg.pack_artifact(payload)
    t2 = time.perf_counter()
    code_bytes = tg.shipped_code_bytes(Path(tg.__file__).read_text(encoding="utf-8"))   # as export_phase counts it
    return {"weights": weights, "quantizer": "gptq" if hessians else "rtn", "calib_s": calib_s,
            "calib_batches": cfg.gptq_calib_batches if hessians else 0, "quantize_s": t1 - t0, "compress_s": t2 - t1, "export_s": t2 - t0,
            "payload_bytes": len(payload), "compressor": compressor, "compressed_bytes": sizes,
            "artifact_bytes": len(blob), "code_bytes": code_bytes, "total_submission_bytes": code_bytes + len(blob),
            "limit_bytes": tg.ARTIFACT_LIMIT_BYTES, "fits": code_bytes + len(blob) <= tg.ARTIFACT_LIMIT_BYTES}


# ==================================================================================================
# Report
# ==================================================================================================

def fmt(v, unit: str = "", digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}{unit}"
    return f"{v:,}{unit}"


def train_rows(label: str, t: dict) -> list[tuple[str, str, str]]:
    return [(label, "passes / params", f"{t['passes']} / {t['params']:,}"),
            (label, "model FLOP per step", f"{t['flop_per_step']:.3e}"),
            (label, "ms/step, 1 device (median)", f"{t['step_ms']:,.1f}  (accum {t['grad_accum']}, {t['timed_steps']} steps)"),
            (label, "forward+backward / optimizer ms, 1 device", f"{t['fwd_bwd_ms']:,.1f} / {t['optimizer_ms']:,.1f}"),
            (label, f"ms/step, {PROJECTION_GPUS} GPUs (projected)",
             f"{t['step_ms_8gpu']:,.1f}  (fwd+bwd / {PROJECTION_GPUS} + optimizer + {t['comm_ms_8gpu']:.2f} ms comm)"),
            (label, "tokens/s, 1 device", fmt(t["tokens_per_s"], digits=0)),
            (label, "achieved TFLOP/s", fmt(t["tflops"], digits=3)),
            (label, "MFU", "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"),
            (label, f"peak memory ({t['memory_kind']})", fmt(t["peak_memory_bytes"] / 2**20, " MiB"))]


def table(results: dict) -> str:
    rows, train = [], results.get("train", {})
    if "compile_warmup" in train:
        w = train["compile_warmup"]
        how = f"compiled, autocast {w['amp'] or 'off'}" if w["compiled"] else f"eager, autocast {w['amp'] or 'off'}"
        rows.append(("train", "compile + warm-up (not step time)",
                     f"{w['seconds']:.1f} s for {w['steps']} steps over states {' '.join(w['states']) or '-'} ({how})"))
    for key, label in (("recur_off", "train, recurrence off"), ("recur_on", "train, recurrence on")):
        if key in train:
            rows += train_rows(label, train[key])
    if "recur_cost_pct" in train:
        rows.append(("train", "recurrence cost (on vs off)", f"{train['recur_cost_pct']:+.1f}% ms/step  "
                     f"({train['recur_off']['passes']} -> {train['recur_on']['passes']} passes)"))
    for key in RECUR_STATES:
        if "step_ms_at_50pct_mfu" in train.get(key, {}):
            rows.append(("train", f"ms/step at 50% MFU, 1 device ({key})", fmt(train[key]["step_ms_at_50pct_mfu"])))
    for name, e in results.get("eval", {}).items():
        label, n = f"eval {name}", PROJECTION_GPUS
        if e.get("mode") == "document":
            u = e["units"]
            per = "  ".join(f"{k.removeprefix('s_per_')} {e[k] * 1e6:,.1f} us" for k in
                            ("s_per_fwd_col", "s_per_slot_col_step", "s_per_lora_col") if e.get(k) is not None)
            if e.get("s_per_phase_step") is not None:
                per += f"  phase_step {e['s_per_phase_step']:.3f} s"
            parts = "  ".join(f"{k} {v:,.1f}" for k, v in e["projected_parts_s_8gpu"].items() if v)
            rows += [(label, "slice / documents / rows", f"{e['slice_tokens']:,} tokens / {e['docs']:,} documents / "
                                                         f"{e['rows']} rows per forward"),
                     (label, "units (forward / SLOT / LoRA columns)",
                      f"{u['fwd_cols']:,} / {u['slot_cols']:,} / {u['lora_cols']:,}"),
                     (label, "seconds (warm-up call)",
                      f"{e['seconds']:.2f}  ({e['warmup_s']:.2f} on {e['warmup_tokens']:,} tokens; "
                      f"phases {e['phase_seconds']:.2f})"),
                     (label, "seconds per unit, 1 device", per or "n/a"),
                     (label, f"full val on {n} GPUs (projected at this device's rates)",
                      f"{e['projected_full_val_s_8gpu']:,.1f} s  ({parts})")]
            continue
        rows += [(label, "slice / windows", f"{e['slice_tokens']:,} tokens / {e['windows']:,} windows "
                                            f"(T {e['seq_len']}, stride {e['stride']})"),
                 (label, "seconds (warm-up call)", f"{e['seconds']:.2f}  ({e['warmup_s']:.2f} on {e['warmup_tokens']:,} tokens)"),
                 (label, "scored tokens/s, 1 device", fmt(e["tokens_per_s"], digits=0)),
                 (label, "achieved TFLOP/s", fmt(e["tflops"], digits=3)),
                 (label, "MFU", "n/a" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"),
                 (label, f"full val on {n} GPUs (projected)",
                  f"{e['projected_full_val_s_8gpu']:,.1f} s  ({e['full_val_windows']:,} windows / {n})")]
        if "ttt_s_per_chunk" in e:
            rows.append((label, "TTT seconds per chunk, 1 device", f"{e['ttt_s_per_chunk']:.3f}  ({e['ttt_chunks_trained']} "
                                                                    f"chunks trained; the full val has {e['full_val_ttt_chunks']:,})"))
    if "export" in results:
        x = results["export"]
        over = "" if x["fits"] else "  OVER THE LIMIT"
        calib = f"{x['calib_s']:.2f} s ({x['calib_batches']} batches), " if x.get("calib_s") is not None else ""
        rows += [("export", f"{'calibrate / ' if calib else ''}quantize ({x['quantizer']}) / compress",
                  f"{calib}{x['quantize_s']:.2f} s / {x['compress_s']:.2f} s"),
                 ("export", "artifact bytes", f"{x['artifact_bytes']:,} ({x['compressor']}; weights: {x['weights']})"),
                 ("export", "code + artifact bytes", f"{x['total_submission_bytes']:,} of {x['limit_bytes']:,}{over}")]
    if not rows:
        return "(no section finished)"
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines + [f"note ({k}): {v}" for k, v in ASSUMPTIONS.items()])


# ==================================================================================================
# Main
# ==================================================================================================

class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones whose help already says what happens."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, "") else super()._get_help_string(action)


def parse_args(argv, run: tg.Run) -> argparse.Namespace:
    cuda = run.device.type == "cuda"
    p = argparse.ArgumentParser(description="Benchmark train_gpt.py (model settings: train_gpt's environment variables).",
                                formatter_class=Help)
    p.add_argument("--sections", default="train,eval,export", help="comma list of train, eval, export")
    p.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed optimizer steps per recurrence state (median reported)")
    p.add_argument("--warmup", type=int, default=3 if cuda else 1,
                   help="compile_warmup's steps (WARMUP_STEPS; it runs at least one per switch state), untimed")
    p.add_argument("--eval-tokens", type=int, default=1_000_000 if cuda else 20_000, help="val tokens evaluated")
    p.add_argument("--eval-modes", default="stream",
                   help="comma list: stream (sliding window, SLOT, TTT as configured) and/or the document modes "
                        f"{', '.join(DOC_MODES)}, or 'documents' for all of them (measured in that order)")
    p.add_argument("--peak-flops", type=float, default=800e12 if cuda else None,
                   help="peak FLOP/s for MFU; default 800e12 on CUDA (H100 dense bf16 as measured achievable; the "
                        "SXM datasheet says 989e12), none on CPU (MFU n/a)")
    p.add_argument("--name", default=None, help="JSON name under LOG_DIR/bench (default: device and timestamp)")
    p.add_argument("--out", default="", help="JSON path (overrides --name)")
    args = p.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    modes = [m.strip() for m in args.eval_modes.split(",") if m.strip()]
    modes = [x for m in modes for x in (DOC_MODES if m == "documents" else (m,))]
    bad_modes = set(modes) - {"stream", *DOC_MODES}
    if bad_modes or not modes:
        p.error(f"--eval-modes: unknown {sorted(bad_modes)}; choose from stream, documents, {', '.join(DOC_MODES)}")
    args.eval_modes = ["stream"] * ("stream" in modes) + [m for m in DOC_MODES if m in modes]
    bad = set(args.sections) - {"train", "eval", "export"}
    if bad or not args.sections:
        p.error(f"--sections: unknown {sorted(bad)}; choose from train, eval, export")
    if args.steps < 1 or args.warmup < 0 or args.eval_tokens < 2:
        p.error("--steps >= 1, --warmup >= 0 and --eval-tokens >= 2 please")
    return args


def device_info(run: tg.Run) -> dict:
    if run.device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(run.device), "count_used": 1, "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}


def measure(cfg: tg.Config, run: tg.Run, args, save) -> dict:
    """Train (both recurrence states), export the EMA weights, evaluate the model, in that order; save(results) after
    each section. Without the train section the model keeps its initialisation."""
    results, model, state = {}, None, None
    if "train" in args.sections:
        results["train"], model, state = bench_train(cfg, run, args.steps, args.warmup, args.peak_flops)
        save(results, "train")
    if model is None:
        model = tg.build_model(cfg, run)
    if "export" in args.sections:
        trained = sum(t["timed_steps"] + 1 for k, t in results.get("train", {}).items() if k in RECUR_STATES)
        weights = f"EMA after {trained} bench steps" if state is not None else "initialisation"
        state = state if state is not None else {n: p.detach().float().cpu() for n, p in model.named_parameters()}
        hessians, calib_s = bench_calibration(cfg, run, model, state)
        results["export"] = bench_export(cfg, state, tg.param_labels(model), weights, hessians, calib_s)
        save(results, "export")
    if "eval" in args.sections:
        results["eval"] = bench_eval(cfg, run, model, args.eval_tokens, args.peak_flops, args.eval_modes)
        save(results, "eval")
    return results


def main(argv=None) -> int:
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            raise tg.RunError("run bench.py as one process (no torchrun): it measures one device and projects to 8")
        cfg, explicit = tg.config_from_env(os.environ)
        run = tg.start_run({}, cfg)   # COMPILE and AUTOCAST from the environment, as train_gpt.py resolves them
    except tg.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    args = parse_args(argv, run)
    dev = device_info(run)
    slug = dev["name"].replace(" ", "_") if dev["type"] == "cuda" else "cpu"
    name = args.name or f"{slug}_{time.strftime('%Y%m%d_%H%M%S')}"
    path = Path(args.out) if args.out else Path(cfg.log_dir) / "bench" / f"{name}.json"
    report = {"name": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
              "python": platform.python_version(), "device": dev, "argv": sys.argv[1:],
              "bench_args": {k: v for k, v in vars(args).items() if k not in ("name", "out")},
              "compiled": run.compiled, "amp": str(run.amp).removeprefix("torch.") if run.amp else None,
              "config": dataclasses.asdict(cfg), "explicit_settings": sorted(explicit),
              "assumptions": ASSUMPTIONS, "projection_gpus": PROJECTION_GPUS, "sections_done": [], "complete": False}

    def save(results: dict, section: str | None = None, **extra) -> None:
        """The report so far, atomically: a run cut short (a time limit) keeps every section that finished."""
        if section:
            report["sections_done"].append(section)
        report.update(results, **extra)
        tg.write_atomic(path, (json.dumps(report, indent=1) + "\n").encode())
        if section:   # a marker for readers of the output (gpu_check counts the recompiles between them)
            print(f"bench_section_done:{section}", flush=True)

    print(f"bench: {dev['name']} ({dev['type']}), torch {torch.__version__}, {cfg.num_layers} layers x {cfg.model_dim}, "
          f"recur {list(cfg.recur_layers)}, batch {cfg.train_batch_tokens:,} tokens of {cfg.train_seq_len}, "
          f"{'compiled' if run.compiled else 'eager'}, autocast {report['amp'] or 'off'}", flush=True)
    results = {}
    try:
        results = measure(cfg, run, args, save)
    except Exception as e:   # the sections done are on disk already; the report says what stopped the rest
        save(results, error=str(e) if isinstance(e, tg.RunError) else f"{type(e).__name__}: {e}")
        if not isinstance(e, tg.RunError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    save(results, complete=True)
    print(table(results))
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

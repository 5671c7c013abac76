"""Eval budget: the work of each part of the evaluation for the FULL validation set, and its 8 x H100 time from FLOPs
and from memory traffic (the larger wins), for stream and document mode.

Counts of work follow train_gpt.py's own code (build_windows; document_spans, assign_documents, doc_width and the
chunk loop of score_document_batch; phase_rows / phase_batch), on a full-size stream of documents whose lengths
follow the proxy val's distribution (the proxy holds the first ~1M val tokens; its documents are tiled until the
full val's token count is reached). The CPU column comes from a tools/bench.py JSON (seconds per unit of work on a
reduced model), scaled to the real model by the FLOP model. Nothing here is measured on a GPU.

    python tools/eval_budget.py --vocab 1024 --bench logs/eval_budget/bench_cpu_sp1024.json \
        --out logs/eval_budget/budget_sp1024.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

# Full validation streams (tokens): sp1024 the official count; sp8192 as logged by an sp8192 record reproduction
# ("val_tokens: 40540160", PR #1727 lineage; not checked against the shard here).
FULL_VAL_TOKENS = {1024: 62_021_846, 8192: 40_540_160}
CASEOPS_VAL_TOKENS = 47_851_520   # the CaseOps val stream as #1855 and #2135 log it (val_tokens == target_tokens)
PROXY_VAL = {1024: "/work/shared/data/fineweb_proxy_sp1024/fineweb_val_000000.bin",
             8192: "/work/shared/data/fineweb_proxy_sp8192/fineweb_val_000000.bin"}
# The README's launch lines (model settings only)
LAUNCH = {1024: {}, 8192: {"VOCAB_SIZE": "8192", "MLP_MULT": "4", "BIGRAM_VOCAB_SIZE": "0", "VE_LAYERS": ""}}
# The README's frontier line: its model on CaseOps (the loop of 3-5: 17 passes) and its evaluation geometry
FRONTIER_MODEL = {**LAUNCH[8192], "CASEOPS": "1", "RECUR_LAYERS": "", "LOOP_LAYERS": "3,4,5", "PARALLEL_START": "8",
                  "ATTN_GATE": "1", "SMEAR_GATE": "input"}
FRONTIER_EVAL = dict(seq_len=2560, stride=48, lora_rank=80, lora_batch=64, phase_docs=2500)
PROXY_CASEOPS_VAL = "/work/shared/data/fineweb_proxy_sp8192_caseops/fineweb_val_000000.bin"


@dataclasses.dataclass(frozen=True)
class Hardware:
    """One H100 SXM. Fractions are assumptions (stated in the README), not measurements."""
    gpus: int = 8
    bf16_peak: float = 989e12
    fp32_peak: float = 67e12         # non-tensor FP32: SLOT's head runs in float32 and TF32 is off (torch default)
    mfu: float = 0.40                # achieved fraction of the peak for the big matmuls
    small_mfu: float = 0.25          # batched per-row LoRA matmuls (rank 96) and the fp32 SLOT head
    hbm: float = 3.35e12
    hbm_eff: float = 0.80            # achievable fraction of the HBM bandwidth
    act_words: int = 30              # d-sized activation reads+writes per token per pass in a forward (bf16)
    logit_passes_score: int = 7      # fp32 [cols, V] reads+writes of scoring: linear, cap, tanh, cap, log_softmax
    logit_passes_slot: int = 25      # per SLOT step: forward chain + bias + CE + its backward, eager (float32)
    slot_bf16: bool = True           # SLOT's step as train_gpt.py has it since 5521897: bf16 logits, float32 loss,
                                     # compiled and fused, over all W columns of each (padded) row (focal 0)
    slot_bf16_bytes: int = 12        # bytes x V per column and step then: bf16 logits, their gradient, each r+w once


def model_shape(vocab: int, overrides: dict | None = None, base: dict | None = None) -> dict:
    """Weights per token of the launch line's model (meta device: shapes only)."""
    env = dict(LAUNCH[vocab] if base is None else base, **(overrides or {}))
    cfg = tg.config_from_env(env)[0]
    with torch.device("meta"):
        model = tg.GPT(cfg)
    model.recur_on = True
    passes = len(model.schedule)
    per_layer = [sum(m.weight.numel() for m in b.modules() if isinstance(m, tg.QLinear)) for b in model.blocks]
    body = sum(per_layer[p.layer] for p in model.schedule)
    extra = (model.bigram.proj.weight.numel() if model.bigram is not None and model.bigram.proj is not None else 0) + \
            (model.value_embed.proj.weight.numel() if model.value_embed is not None else 0)
    kv = model.blocks[0].attn.c_k.weight.size(0)
    d = cfg.model_dim
    params = sum(p.numel() for p in model.parameters())
    return {"vocab": vocab, "d": d, "kv": kv, "passes": passes, "body_weights": body + extra, "params": params,
            "layers": cfg.num_layers, "mlp_mult": cfg.mlp_mult}


def adapter_weights(shape: dict, rank: int) -> int:
    """LoRA weights each token multiplies through (Adapters: q, k, v, o, m per pass + the head)."""
    d, kv = shape["d"], shape["kv"]
    per_pass = sum(d * rank + rank * o for o in (d, kv, kv, d, d))
    return shape["passes"] * per_pass + d * rank + rank * shape["vocab"]


# ---- counts of work ---------------------------------------------------------------------------------------------

def proxy_lengths(vocab: int, path: str = "") -> np.ndarray:
    tokens = torch.from_numpy(tg.read_shard(path or PROXY_VAL[vocab], vocab).astype(np.int64))
    spans = tg.document_spans(tokens)
    return (spans[:, 1] - spans[:, 0]).astype(np.int64)


def full_lengths(lengths: np.ndarray, total_tokens: int, seed: int = 0) -> np.ndarray:
    """Document lengths (targets) of a stream of `total_tokens`: whole copies of `lengths`, then a random subset of
    them (fixed seed), in a shuffled order, summing to within one document of the total."""
    copies = total_tokens // int(lengths.sum())
    out = [np.tile(lengths, copies)]
    rng = np.random.default_rng(seed)
    rest, left = rng.permutation(lengths), total_tokens - copies * int(lengths.sum())
    take = int(np.searchsorted(np.cumsum(rest), left))
    out.append(rest[:take])
    full = np.concatenate(out)
    return full[rng.permutation(len(full))]


def stream_work(n_tokens: int, geo: tg.Geometry) -> dict:
    """Stream mode: windows of build_windows (all seq_len wide); per window, SLOT fits on the context columns
    (first scored column), the head scores `stride` columns."""
    windows = 1 + max(0, -(-(n_tokens - 1 - geo.seq_len) // geo.stride))
    ctx = geo.seq_len - geo.stride
    return {"windows": windows, "fwd_cols": windows * geo.seq_len, "head_cols": n_tokens - 1,
            "slot_cols": windows * ctx, "width": geo.seq_len, "tokens": n_tokens}


def batch_work(lengths: np.ndarray, geo: tg.Geometry, rows: int) -> dict:
    """One batch of score_document_batch (lengths padded to `rows` with 0): forward columns (rows x width per chunk),
    SLOT columns (rows x the columns with context), head columns, columns whose chunk trains the LoRA, and the
    forward columns weighted by width (for attention)."""
    L = np.zeros(rows, dtype=np.int64)
    L[:len(lengths)] = lengths
    n_chunks = -(-L // geo.stride)
    out = dict(fwd_cols=0, slot_cols=0, head_cols=0, lora_cols=0, attn_cols=0, chunks=0)
    for c in range(int(n_chunks.max())):
        ends = np.minimum(L, (c + 1) * geo.stride)
        width = tg.doc_width(int(ends.max()), geo)
        offset = np.maximum(0, ends - width)
        active = n_chunks > c
        first = np.where(active, c * geo.stride - offset, 0)
        last = np.where(active, ends - offset, 0)
        out["fwd_cols"] += rows * width
        out["attn_cols"] += rows * width * width
        out["slot_cols"] += rows * int(first.max())
        out["head_cols"] += rows * int(last.max() - first[active].min())
        out["lora_cols"] += rows * width * bool((active & (c < n_chunks - 1)).any())
        out["chunks"] += 1
    return out


def document_work(lengths: np.ndarray, geo: tg.Geometry, rows: int, world: int, phases: tg.Phases | None) -> dict:
    """Document mode on `world` ranks: every group's documents balanced as assign_documents does, in batches of
    `rows`; the slowest rank's totals (what the clock waits for) and the mean. Phases: the steps of phase_train over
    the first `phases.docs` documents (each step PHASE_ROWS padded rows of seq_len on every rank)."""
    groups = tg.document_groups(len(lengths), phases)
    keys = ("fwd_cols", "slot_cols", "head_cols", "lora_cols", "attn_cols", "chunks", "batches")
    per_rank = [dict.fromkeys(keys, 0) for _ in range(world)]
    critical = dict.fromkeys(keys, 0)     # every group ends at a barrier: the slowest rank of each group, summed
    for g0, g1 in groups:
        group = [dict.fromkeys(keys, 0) for _ in range(world)]
        for r, docs in enumerate(assign_documents_fast(lengths[g0:g1], world, geo)):
            for i in range(0, len(docs), rows):
                w = batch_work(lengths[g0:g1][docs[i:i + rows]], geo, rows)
                for k, v in w.items():
                    group[r][k] += v
                group[r]["batches"] += 1
        for r in range(world):
            for k in keys:
                per_rank[r][k] += group[r][k]
        slow = max(range(world), key=lambda r: group[r]["fwd_cols"])
        for k in keys:
            critical[k] += group[slow][k]
    out = {"docs": len(lengths), "tokens": int(lengths.sum()) + 1, "rows": rows, "world": world,
           "slowest_rank": critical,
           "mean_rank": {k: sum(p[k] for p in per_rank) / world for k in keys},
           "phase_steps": 0, "phase_targets": 0, "phase_row_tokens_per_rank": 0}
    if phases is not None:
        steps = targets = 0
        per_step = max(1, phases.tokens // geo.seq_len)
        for g0, g1 in groups[:-1]:
            pieces = int(sum(-(-int(n) // geo.seq_len) for n in lengths[g0:g1]))
            steps += -(-pieces // per_step)
            targets += int(lengths[g0:g1].sum())
        out.update(phase_steps=steps, phase_targets=targets,
                   phase_row_tokens_per_rank=steps * tg.PHASE_ROWS * geo.seq_len)   # padded: PHASE_ROWS per rank
    return out


def assign_documents_fast(lengths: np.ndarray, world: int, geo: tg.Geometry) -> list[np.ndarray]:
    """tg.assign_documents with doc_cost memoised by length (the same assignment; tested against it)."""
    cache: dict[int, int] = {}

    def cost(n: int) -> int:
        if n not in cache:
            cache[n] = tg.doc_cost(n, geo)
        return cache[n]

    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    loads, out = [0] * world, [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda q: (loads[q], q))
        out[r].append(i)
        loads[r] += cost(int(lengths[i]))
    return [np.asarray(o, dtype=np.int64) for o in out]


# ---- FLOP and byte model per unit of work ---------------------------------------------------------------------------

def unit_costs(shape: dict, hw: Hardware, lora_rank: int, width: float) -> dict:
    """(FLOP, bytes) per unit: a forward column at mean attended width `width`, a scored head column, a SLOT step on
    one column, a LoRA column (the adapters' extra forward + backward to the inputs + adapter weight gradients), a
    trained token (all weights, fwd+bwd, at seq_len `width`)."""
    d, V, P, W = shape["d"], shape["vocab"], shape["passes"], shape["body_weights"]
    attn = 2 * d * width * P                   # causal QK^T + AV per token (bench.py's convention)
    a = adapter_weights(shape, lora_rank) if lora_rank else 0
    act = hw.act_words * d * 2 * P             # bf16 activations per column per forward
    return {
        "fwd": (2 * W + attn, act),
        "head": (2 * V * d, hw.logit_passes_score * 4 * V),
        "slot_step": (4 * V * d, hw.logit_passes_slot * 4 * V),
        "lora": (2 * a + 2 * W + 2.5 * attn + 4 * a, 2 * act + 3 * 2 * (a // max(1, d))),
        "train_token": (6 * W + 3 * attn + 6 * V * d, 3 * act + 3 * 4 * V),
    }


def seconds(flop: float, nbytes: float, rate: float, hw: Hardware) -> dict:
    f, b = flop / rate, nbytes / (hw.hbm * hw.hbm_eff)
    return {"flop": flop, "bytes": nbytes, "s_flop": f, "s_bytes": b, "s": max(f, b),
            "bound": "flop" if f >= b else "memory"}


def slot_terms(u: dict, ctx_cols: float, all_cols: float, shape: dict, hw: Hardware, small: float, fp32: float):
    """(columns per step, FLOP rate, bytes per column-step) of SLOT: the current code (bf16 logits, compiled, every
    column of the padded rows) or the eager float32 version (context columns only) measured before 5521897."""
    if hw.slot_bf16:
        return all_cols, small, hw.slot_bf16_bytes * shape["vocab"]
    return ctx_cols, fp32, u["slot_step"][1]


def project(shape: dict, work: dict, mode: str, hw: Hardware, slot_steps: int, lora_rank: int,
            ttt_epochs: int = 0) -> dict:
    """Per part, seconds on `hw.gpus` GPUs (one rank's share: stream windows split evenly; document mode the slowest
    rank's own totals), from FLOPs and from bytes, the larger kept."""
    big, small, fp32 = hw.bf16_peak * hw.mfu, hw.bf16_peak * hw.small_mfu, hw.fp32_peak * 0.5
    parts = {}
    if mode == "stream":
        n = hw.gpus
        u = unit_costs(shape, hw, 0, work["width"] / 2)
        parts["scoring"] = seconds((u["fwd"][0] * work["fwd_cols"] + u["head"][0] * work["head_cols"]) / n,
                                   (u["fwd"][1] * work["fwd_cols"] + u["head"][1] * work["head_cols"]) / n, big, hw)
        if slot_steps:
            cols, rate, nbytes = slot_terms(u, work["slot_cols"], work["fwd_cols"], shape, hw, small, fp32)
            parts["slot"] = seconds(u["slot_step"][0] * cols * slot_steps / n, nbytes * cols * slot_steps / n, rate, hw)
        if ttt_epochs:
            parts["ttt"] = seconds(u["train_token"][0] * work["tokens"] * ttt_epochs / n,
                                   u["train_token"][1] * work["tokens"] * ttt_epochs / n, big, hw)
        return parts
    r = work["slowest_rank"]
    mean_w = r["attn_cols"] / max(1, r["fwd_cols"]) / 2      # mean attended context of a forward column
    u = unit_costs(shape, hw, lora_rank, mean_w)
    parts["scoring"] = seconds(u["fwd"][0] * r["fwd_cols"] + u["head"][0] * r["head_cols"],
                               u["fwd"][1] * r["fwd_cols"] + u["head"][1] * r["head_cols"], big, hw)
    if slot_steps:
        ad = (4 * (shape["d"] * lora_rank + lora_rank * shape["vocab"]) if lora_rank else 0)
        cols, rate, nbytes = slot_terms(u, r["slot_cols"], r["fwd_cols"], shape, hw, small, fp32)
        parts["slot"] = seconds((u["slot_step"][0] + ad) * cols * slot_steps, nbytes * cols * slot_steps, rate, hw)
    if lora_rank:
        parts["lora"] = seconds(u["lora"][0] * r["lora_cols"], u["lora"][1] * r["lora_cols"], small, hw)
    if work["phase_steps"]:
        t = unit_costs(shape, hw, 0, work.get("phase_width", 2048) / 2)["train_token"]
        tok = work["phase_row_tokens_per_rank"]
        parts["phases"] = seconds(t[0] * tok, t[1] * tok, big, hw)
    return parts


FIXED = {   # seconds inside our 520 s that no CPU can measure (assumptions, see the README)
    "read_artifact": 5.0,            # read + decompress (lzma/brotli, ~16 MB) + dequantize + build the model
    "warmup_stream": 60.0,           # compile: one forward shape (+ TTT's train graph); records: 86-165 s for TTT
    "warmup_document": 120.0,        # compile: 4 widths x (forward + adapters' backward) + the phase step
}


def table(vocab: int, hw: Hardware, combos: list[dict], lengths: np.ndarray, world: int = 8) -> list[dict]:
    shape = model_shape(vocab)
    geo = tg.Geometry()
    rows_out = []
    for combo in combos:
        mode = combo["mode"]
        if mode == "stream":
            work = stream_work(FULL_VAL_TOKENS[vocab], geo)
        else:
            phases = tg.Phases(count=combo["phase_count"]) if combo["phase_count"] else None
            rows = combo["lora_batch"] if combo["lora_rank"] else geo.batch_windows
            work = document_work(lengths, geo, rows, world, phases)
        parts = project(shape, work, mode, hw, combo["slot_steps"], combo.get("lora_rank", 0), combo.get("ttt_epochs", 0))
        fixed = FIXED["read_artifact"] + FIXED["warmup_" + mode]
        total = fixed + sum(p["s"] for p in parts.values())
        rows_out.append({"vocab": vocab, **combo, "parts": parts, "fixed_s": fixed, "total_s": total,
                         "work": {k: v for k, v in work.items() if k != "mean_rank"}})
    return rows_out


COMBOS = [
    {"name": "stream plain", "mode": "stream", "slot_steps": 0, "ttt_epochs": 0},
    {"name": "stream SLOT-8", "mode": "stream", "slot_steps": 8, "ttt_epochs": 0},
    {"name": "stream TTT-3", "mode": "stream", "slot_steps": 0, "ttt_epochs": 3},
    {"name": "stream SLOT-8 + TTT-3 (default)", "mode": "stream", "slot_steps": 8, "ttt_epochs": 3},
    {"name": "stream SLOT-4 + TTT-3", "mode": "stream", "slot_steps": 4, "ttt_epochs": 3},
    {"name": "stream SLOT-2 + TTT-3", "mode": "stream", "slot_steps": 2, "ttt_epochs": 3},
    {"name": "document plain", "mode": "document", "slot_steps": 0, "lora_rank": 0, "lora_batch": 64, "phase_count": 0},
    {"name": "document SLOT-8", "mode": "document", "slot_steps": 8, "lora_rank": 0, "lora_batch": 64, "phase_count": 0},
    {"name": "document LoRA-96", "mode": "document", "slot_steps": 0, "lora_rank": 96, "lora_batch": 64, "phase_count": 0},
    {"name": "document LoRA-96 + phases 1", "mode": "document", "slot_steps": 0, "lora_rank": 96, "lora_batch": 64,
     "phase_count": 1},
    {"name": "document LoRA-96 + SLOT-8", "mode": "document", "slot_steps": 8, "lora_rank": 96, "lora_batch": 64,
     "phase_count": 0},
    {"name": "document LoRA-96 + SLOT-8 + phases 1", "mode": "document", "slot_steps": 8, "lora_rank": 96,
     "lora_batch": 64, "phase_count": 1},
    {"name": "document LoRA-96 + phases 3", "mode": "document", "slot_steps": 0, "lora_rank": 96, "lora_batch": 64,
     "phase_count": 3},
    {"name": "document LoRA-96 + SLOT-2 + phases 1", "mode": "document", "slot_steps": 2, "lora_rank": 96,
     "lora_batch": 64, "phase_count": 1},
    {"name": "document LoRA-96 + SLOT-4 + phases 1", "mode": "document", "slot_steps": 4, "lora_rank": 96,
     "lora_batch": 64, "phase_count": 1},
    {"name": "document LoRA-96 + SLOT-4 + phases 3", "mode": "document", "slot_steps": 4, "lora_rank": 96,
     "lora_batch": 64, "phase_count": 3},
    {"name": "document LoRA-96 + SLOT-8 + phases 3", "mode": "document", "slot_steps": 8, "lora_rank": 96,
     "lora_batch": 64, "phase_count": 3},
]


def cpu_rates(bench: dict) -> dict:
    """From a tools/bench.py JSON (the reduced model on CPU): each part's measured seconds per unit of work, the FLOP
    per unit that the model above gives for that reduced model, and so the CPU FLOP/s each part achieved. Parts that
    reach a similar rate are described by the FLOP model; a part far below the forward's rate is bound by memory
    traffic or overhead, and its bytes line is the one to trust."""
    cfg = bench["config"]
    over = {"NUM_LAYERS": str(cfg["num_layers"]), "MODEL_DIM": str(cfg["model_dim"]), "NUM_HEADS": str(cfg["num_heads"]),
            "NUM_KV_HEADS": str(cfg["num_kv_heads"]), "MLP_MULT": str(cfg["mlp_mult"]),
            "VOCAB_SIZE": str(cfg["vocab_size"]), "BIGRAM_VOCAB_SIZE": str(cfg["bigram_vocab_size"]),
            "RECUR_LAYERS": ",".join(map(str, cfg["recur_layers"])), "VE_LAYERS": ",".join(map(str, cfg["ve_layers"])),
            "PARALLEL_START": str(cfg["parallel_start"])}
    shape = model_shape(cfg["vocab_size"], over)
    shape["passes"] = cfg["num_layers"] + 0   # no recurrence in the bench model
    e = bench["eval"]
    doc = e.get("document", {})
    width = doc.get("units", {}).get("attn_cols", 0) / max(1, doc.get("units", {}).get("fwd_cols", 1)) / 2
    u = unit_costs(shape, Hardware(), cfg["lora_rank"], width)
    out = {"shape": shape, "parts": {}}

    def add(name, seconds, flop, what):
        out["parts"][name] = {"s_per_unit": seconds, "flop_per_unit": flop, "cpu_gflops": flop / seconds / 1e9,
                              "unit": what}
    if "sliding" in e:
        s = e["sliding"]
        cols = s["windows"] * s["seq_len"]
        us = unit_costs(shape, Hardware(), 0, s["seq_len"] / 2)
        add("stream forward", s["seconds"] / cols, us["fwd"][0] + us["head"][0] * s["scored_tokens"] / cols,
            "window column (head on the scored ones)")
        if "slot" in e:
            ctx = s["windows"] * (s["seq_len"] - s["stride"]) * e["slot"]["slot"]["steps"]
            add("stream SLOT step", (e["slot"]["seconds"] - s["seconds"]) / ctx, us["slot_step"][0], "context column x step")
        key = "slot_ttt" if "slot_ttt" in e else "ttt" if "ttt" in e else None
        if key:
            t = e[key]
            add("stream TTT", t["ttt_s_per_chunk"] / (t["ttt"]["chunk_tokens"] * t["ttt"]["epochs"]),
                unit_costs(shape, Hardware(), 0, s["seq_len"] / 2)["train_token"][0], "trained token x epoch")
    if doc.get("s_per_fwd_col"):
        add("document forward", doc["s_per_fwd_col"], u["fwd"][0] + u["head"][0] * doc["units"]["head_cols"] /
            doc["units"]["fwd_cols"], "row x width column")
    for name, key, flop, what in (("document SLOT step", "s_per_slot_col_step", u["slot_step"][0], "context column x step"),
                                  ("document LoRA", "s_per_lora_col", u["lora"][0], "row x width column of a chunk that trains")):
        src = e.get("document_slot" if "SLOT" in name else "document_lora", {})
        if src.get(key):
            add(name, src[key], flop, what)
    lora_slot = e.get("document_lora_slot", {})
    if lora_slot.get("s_per_slot_col_step"):
        ad = 4 * (shape["d"] * cfg["lora_rank"] + cfg["lora_rank"] * shape["vocab"])
        add("document SLOT step (with LoRA head)", lora_slot["s_per_slot_col_step"], u["slot_step"][0] + ad,
            "context column x step")
    ph = e.get("document_lora_slot_phases", {})
    if ph.get("s_per_phase_step"):
        tok = tg.PHASE_ROWS * cfg["eval_seq_len"]
        add("phase step", ph["s_per_phase_step"], tok * unit_costs(shape, Hardware(), 0, cfg["eval_seq_len"] / 2)
            ["train_token"][0], f"step ({tg.PHASE_ROWS} rows x {cfg['eval_seq_len']})")
    return out


def frontier_check(hw: Hardware) -> dict:
    """The same model applied to #1855's evaluation (sp8192, 11 x 512, MLP 4x, loop 3-5 x3 = 17 passes, LoRA rank 96,
    64 documents per batch, 32-token chunks, no SLOT), for comparison with its logged eval times (330-570 s on
    8 x H100 with FA3, compile warm-up outside its timer). Its phases (3, cumulative prefix of 2,000 documents) are
    approximated by ours (each group once)."""
    shape = model_shape(8192)
    shape = dict(shape, passes=17, body_weights=shape["body_weights"] * 17 // 13)
    geo = tg.Geometry(stride=32)
    lengths = full_lengths(proxy_lengths(8192), FULL_VAL_TOKENS[8192])
    work = document_work(lengths, geo, 64, hw.gpus, tg.Phases(count=3))
    parts = project(shape, work, "document", hw, 0, 96)
    return {"parts": parts, "total_s_without_fixed": sum(p["s"] for p in parts.values()),
            "logged_s": [330, 570], "note": "#1855 (ANCHORS.md / the brief); its timer excludes compile warm-up"}


def frontier_line(hw: Hardware, slot_steps: tuple[int, ...] = (2, 0, 4, 8)) -> list[dict]:
    """The README's frontier line (FRONTIER_MODEL, FRONTIER_EVAL: 17 passes, context 2560, 48-target chunks, LoRA 80,
    one phase over 2,500 documents) on the CaseOps val's length, its documents' lengths from the CaseOps proxy; one row
    per SLOT setting (the line's 2 first), fixed costs as for our other rows."""
    shape = model_shape(8192, base=FRONTIER_MODEL)
    e = FRONTIER_EVAL
    geo = tg.Geometry(seq_len=e["seq_len"], stride=e["stride"])
    lengths = full_lengths(proxy_lengths(8192, PROXY_CASEOPS_VAL), CASEOPS_VAL_TOKENS)
    work = document_work(lengths, geo, e["lora_batch"], hw.gpus, tg.Phases(docs=e["phase_docs"], count=1))
    work["phase_width"] = e["seq_len"]
    rows = []
    for steps in slot_steps:
        parts = project(shape, work, "document", hw, steps, e["lora_rank"])
        fixed = FIXED["read_artifact"] + FIXED["warmup_document"]
        rows.append({"name": f"frontier line, LoRA-{e['lora_rank']} + SLOT-{steps} + 1 phase", "slot_steps": steps,
                     "parts": parts, "fixed_s": fixed, "total_s": fixed + sum(p["s"] for p in parts.values()),
                     "passes": shape["passes"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, choices=(1024, 8192), required=True)
    p.add_argument("--bench", default="", help="a tools/bench.py JSON of this vocabulary: its CPU rates per part")
    p.add_argument("--out", required=True)
    p.add_argument("--mfu", type=float, default=Hardware.mfu)
    p.add_argument("--small-mfu", type=float, default=Hardware.small_mfu)
    p.add_argument("--frontier", action="store_true", help="also apply the model to #1855's evaluation")
    p.add_argument("--slot-fp32", action="store_true", help="SLOT as before 5521897: eager float32, context columns")
    p.add_argument("--frontier-line", action="store_true", help="also project the README's frontier line (CaseOps)")
    args = p.parse_args(argv)
    hw = Hardware(mfu=args.mfu, small_mfu=args.small_mfu, slot_bf16=not args.slot_fp32)
    lengths = full_lengths(proxy_lengths(args.vocab), FULL_VAL_TOKENS[args.vocab])
    rows = table(args.vocab, hw, COMBOS, lengths)
    result = {"vocab": args.vocab, "full_val_tokens": FULL_VAL_TOKENS[args.vocab], "docs_synth": len(lengths),
              "hardware": dataclasses.asdict(hw), "fixed": FIXED, "shape": model_shape(args.vocab), "rows": rows}
    if args.bench:
        result["cpu"] = cpu_rates(json.loads(Path(args.bench).read_text()))
        for k, v in result["cpu"]["parts"].items():
            print(f"cpu {k:<38} {1e6 * v['s_per_unit']:10.2f} us per {v['unit']}  ({v['cpu_gflops']:.1f} GFLOP/s)")
    if args.frontier:
        result["frontier_1855"] = frontier_check(hw)
        f = result["frontier_1855"]
        print("frontier #1855 check: " + "  ".join(f"{k} {v['s']:.1f}" for k, v in f["parts"].items())
              + f"  = {f['total_s_without_fixed']:.1f} s (logged 330-570 s)")
    if args.frontier_line:
        result["frontier_line"] = frontier_line(hw)
        for r in result["frontier_line"]:
            print(f"{r['name']} ({r['passes']} passes): fixed {r['fixed_s']:.0f} + "
                  + "  ".join(f"{k} {v['s']:.1f}" for k, v in r["parts"].items()) + f"  = {r['total_s']:.0f} s")
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    for r in rows:
        pr = r["parts"]
        cell = lambda k: f"{pr[k]['s']:.1f}" if k in pr else ""
        result.setdefault("markdown", []).append(
            f"| {r['name']} | {r['fixed_s']:.0f} | {cell('scoring')} | {cell('slot')} | "
            f"{cell('ttt') or cell('lora')} | {cell('phases')} | {r['total_s']:.0f} |")
    Path(args.out).write_text(json.dumps(result, indent=1, default=float) + "\n")
    for r in rows:
        parts = "  ".join(f"{k} {v['s']:.1f} ({v['bound'][0]})" for k, v in r["parts"].items())
        print(f"sp{args.vocab}  {r['name']:<42} total {r['total_s']:6.1f} s  = fixed {r['fixed_s']:.0f} + {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

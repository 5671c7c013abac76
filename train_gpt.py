"""Parameter Golf, 10 min / 16 MB track: train, pack and evaluate one GPT in a single torchrun-launched file.

What the defaults do, in the order of this file:
- model: 11 layers x 512 (8 heads, 4 KV heads, MLP 3x), vocab 1024; layers 4 and 5 run a second pass, conditioned by
  iter_embed / iter_gate, from 35% of the run on (13 passes after the switch, 11 before it);
- training: Muon + AdamW on 8 ranks inside a 600 s wall-clock cap, every graph compiled before the clock starts, EMA
  weights, late QAT on the export's grid; GPTQ's Hessians are collected from training batches inside the same cap;
- export: GPTQ int6 (int8 embedding tables), packed with LZMA / brotli / zstd under 16,000,000 bytes with the code;
- evaluation: the artifact read back from disk, every val target scored once by a sliding window (2048 / 64) with a
  per-window context-only SLOT and score-first TTT, under one 520 s budget.
Settings are environment variables named after the fields of `Config`; COMPILE and AUTOCAST choose compiled bf16
(the CUDA default) or eager float32 (the CPU default).

    torchrun --standalone --nproc_per_node=8 train_gpt.py
"""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import difflib
import gc
import glob
import importlib
import io
import json
import lzma
import math
import os
import platform
import re
import sys
import threading
import time
import traceback
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ==================================================================================================
# Config: every setting, its checks, and the names other software uses
# ==================================================================================================

BOS_ID = 1                       # every document starts with BOS (id 1); there is no EOS
CASEOPS_SUFFIX = "_lossless_caps_caseops_v1_reserved"   # the CaseOps export's folder and tokenizer names (#1729)
CASEOPS_OPERATORS = ("\ue001", "\ue002", "\ue003", "\ue004")   # TitleCase, ALLCAPS, next capital, literal
ARTIFACT_LIMIT_BYTES = 16_000_000
REFERENCE_GPUS = 8               # the batch is defined for 8 GPUs; fewer GPUs accumulate gradients
CAP_SLACK_S = 0.25               # wall-clock slack for a hiccup the recent step times did not show (GC, I/O)
RESERVE_MARGIN = 1.5             # the calibration reserve over its measured time (same device and shapes; 1.5x for
                                 # data reads the warm-up's cache hid; calibrate's agreed early stop is the backstop)
INT6_MAX, INT8_MAX = 31, 127
PHASE_SETS = ({"train", "export", "eval"}, {"train", "export"}, {"eval"})


class RunError(Exception):
    """A problem the user must fix (bad setting, bad data, over-size artifact): one line, exit code 1."""


def need(ok: bool, msg: str) -> None:
    if not ok:
        raise RunError(msg)


def settings_view(cls, cfg, prefix: str):
    """One technique's settings (Slot, Ttt, QuantSpec), read from the Config fields named <prefix><field>: each
    setting is labelled once, in Config."""
    return cls(**{f.name: getattr(cfg, prefix + f.name) for f in dataclasses.fields(cls)})


@dataclass
class Config:
    """Every setting of a run. The defaults ARE the submitted configuration; env var = field name in upper case."""
    # ---- run and data
    data_path: str = ""              # default ./data/datasets/fineweb10B_sp<VOCAB_SIZE>, where data/download.py puts it
    tokenizer_path: str = ""         # default: ./data/tokenizers/fineweb_<VOCAB_SIZE>_bpe.model
    run_id: str = ""                 # default: a timestamp, the same on every rank
    seed: int = 1337
    phases: str = "train,export,eval"
    log_dir: str = "logs"
    watchdog_seconds: float = 300.0  # a rank this long without progress (or waiting 2x in a collective) ends the run
    artifact_path: str = ""          # written by an export (default: beside its log); with PHASES=eval, read
    nll_dump_path: str = ""          # when set: per-target NLL of the final evaluation (.npy, float64)
    caseops: bool = False            # the CaseOps data (#1729): the paths of data/download.py --variant sp8192_caseops
    # ---- model
    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 3
    rope_dims: int = 16              # partial RoPE: rotate 16 of the 64 head dims
    rope_base: float = 10000.0
    qk_gain_init: float = 5.0        # per-head gain on the normalized q (#1217, #1413 and the frontier)
    logit_softcap: float = 30.0
    bigram_vocab_size: int = 2048    # BigramHash buckets (0 = off)
    bigram_dim: int = 128
    recur_layers: tuple[int, ...] = (4, 5)   # layers run twice, conditioned by iter_embed / iter_gate (PR #1278)
    ve_dim: int = 128                # value embeddings: a second token table added to the values (PR #1278)
    ve_layers: tuple[int, ...] = (-2, -1)    # layers whose values get it, negative from the end; empty = off
    parallel_start: int = 7          # layers from this one on: attention and MLP read one input (#1204, #1493); 0 off
    ln_scale: bool = True            # each block's normalised inputs x 1/sqrt(physical layer + 1) (#1278, #1394)
    doc_attention: bool = True       # attention never crosses a BOS: one document per sequence (#1530's VarLenAttn)
    loop_layers: tuple[int, ...] = ()    # consecutive layers run as one segment LOOP_PASSES times (#1344; #1855: 3-5)
    loop_passes: int = 3             # the segment's passes in all (#1855's NUM_LOOPS=2 is 3)
    attn_gate: bool = False          # SparseAttnGate: a per-head gate on each attention output (#1787, #1855)
    attn_gate_scale: float = 0.5     # the gate's logits x this (#1855; #1787: 1.0)
    gate_dims: int = 12              # the leading dims ATTN_GATE and SMEAR_GATE=input read (#1855's GATE_WINDOW)
    smear_gate: str = "vector"       # vector: one learned gate per dim (seed) | input: a gate per token (#1667, #1855)
    # ---- training
    iterations: int = 20000          # an upper bound: the wall-clock cap ends a real run first
    max_wallclock_seconds: float = 600.0
    train_batch_tokens: int = 786_432
    train_seq_len: int = 2048
    warmup_steps: int = 20           # compile warm-up steps, discarded before the clock starts
    warmdown_frac: float = 0.72      # last fraction of the expected run with a linear LR decay to 0 (#1493)
    min_lr: float = 0.0              # the warm-down's floor, a fraction of the peak LR (#1787: 0.10)
    seq_schedule: str = ""           # progressive context (#2014): "1024,2048@0.1,3072@0.7", length from a fraction on
    seq_rewarm_steps: int = 32       # after a SEQ_SCHEDULE length change the LR ramps back over this many steps (#2014)
    matrix_lr: float = 0.025
    scalar_lr: float = 0.025
    tied_embed_lr: float = 0.035
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    muon_wd: float = 0.04
    muon_ns: str = "jordan"          # Newton-Schulz coefficients (NS_COEFFS): jordan | polar (#1344, #1787)
    grad_clip_norm: float = 0.3      # global gradient norm clip (PR #1278); 0 = off
    adam_wd: float = 0.04
    beta1: float = 0.9
    beta2: float = 0.95
    ema_decay: float = 0.997
    late_qat_frac: float = 0.1       # last fraction of the expected run trained through fake int6 weights
    recur_start_frac: float = 0.35   # the extra passes (RECUR_LAYERS, LOOP_LAYERS) start here in the run (#1493-#2135)
    val_loss_every: int = 0          # 0 = no validation during training (the final one always runs)
    train_log_every: int = 100
    compile: str = "auto"            # torch.compile the forwards: 1 | 0 | auto (compiled on CUDA, eager on CPU)
    autocast: str = "auto"           # every phase's autocast: bf16 | off | auto (bf16 on CUDA, off on CPU)
    # ---- export: quantization (see quantize_tensor)
    int6_clip_k: float = 6.0         # row clip = k x row std (SDClip, #1394), the size knob; 0 = per-row search
    embed_clip_k: float = 0.0        # the clip rule of the int8 embedding tables (0 = the search)
    embed_bits: int = 8              # bits of the embedding tables' codes, 5..8 (#1586 and #1855 use 7)
    mlp_clip_k: float = 0.0          # the MLP matrices' SDClip k (#1855: 11.5, attention 13); 0 = INT6_CLIP_K
    lqer_rank: int = 0               # rank of an SVD correction of the GPTQ error W - Q (LQER, #1797; #1855: 4); 0 off
    lqer_top: int = 3                # the tensors with the largest ||W - Q|| (Frobenius) get it (#1797, #1855)
    lqer_group: int = 64             # LQER's B: int4 codes, one fp16 scale per group of this many (A: int2, one scale)
    awq_group: int = 0               # columns of the one most salient input group kept int8 inside GPTQ (#1908: 64)
    pack_groups: bool = False        # codes laid out by role, rows L1-sorted, transposed, for the compressor (#1855)
    gptq_calib_batches: int = 16     # training micro-batches (TRAIN_BATCH_TOKENS / 8 tokens each) for the Hessians
    gptq_reserve_seconds: float = 0.0    # of MAX_WALLCLOCK_SECONDS, kept for the calibration; 0 = measured (warm-up)
    gptq_damp: float = 0.01          # added to the Hessian diagonal, as a fraction of its mean
    eval_prequant: bool = False      # also score the EMA weights before quantization (prequant_exact)
    # ---- evaluation
    val_tokens: int = 0              # 0 = the whole validation stream; N = its first N tokens (quick checks only)
    eval_seq_len: int = 2048
    eval_stride: int = 64
    eval_batch_windows: int = 32     # windows per forward (and per SLOT batch), per rank
    eval_budget_seconds: float = 520.0   # 600 s less 10% and a margin: the ranks agree on cuts (BUDGET_CUT_ORDER)
    eval_compare_plain: bool = False # also run the plain sliding eval first (final_sliding_window_exact)
    eval_mode: str = "document"      # document: each document alone (#1530-#2135) | stream: windows over the stream
    # ---- TTT (score-first test-time training; see Ttt)
    ttt_epochs: int = 3              # SGD steps on each scored chunk but the last; 0 = off
    ttt_chunk_tokens: int = 32768    # as #549 and #1413 (16,384 is the smallest that fills every 8-GPU scoring batch)
    ttt_lr: float = 0.005            # cosine over the chunks (#1413; #549 used 0.002)
    ttt_momentum: float = 0.9
    ttt_clip: float = 1.0            # global gradient norm
    ttt_reset: str = "never"         # or "document": a chunk also starts after every BOS, from the artifact's weights
    # ---- document mode: per-document LoRA TTT (see Lora) and phased global SGD (see Phases); #1855's values
    lora_rank: int = 96              # 0 = off (the document mode then only scores)
    lora_alpha: float = 144.0        # delta = (x A^T) B^T x alpha / rank (#1767)
    lora_lr: float = 1e-4
    lora_weight_decay: float = 1.0
    lora_beta2: float = 0.999        # Adam without momentum (beta1 0), eps 1e-10
    lora_batch: int = 64             # documents per forward (rows), per rank
    lora_carry: bool = True          # A carried from batch to batch (#1767; B and the Adam state restart per batch)
    phase_docs: int = 2000           # the first documents in stream order that the phases train on (#1626: 2000)
    phase_count: int = 1             # global SGD pauses within them (0 = off; #1626: 1-3, 6+ overfit)
    phase_lr: float = 0.001          # SGD, cosine over the phase's steps (#1626)
    phase_momentum: float = 0.9
    phase_clip: float = 1.0
    phase_tokens: int = 32768        # targets per global SGD step, shared by all ranks (#1626)
    # ---- SLOT (causal, context-only; see Slot)
    slot_steps: int = 8              # 0 = plain sliding-window eval
    slot_lr: float = 0.05
    slot_lr_min: float = 0.005       # cosine floor
    slot_focal: int = 0              # context targets in the loss: the last N before the scored slice; 0 = all
    slot_bias: bool = True           # also a per-window logit bias [V] (it carries almost all of the gain)
    slot_warm_start: float = 0.5     # alpha: start from alpha x the previous batch's mean delta and bias; 0 = off

    def __post_init__(self) -> None:
        variant = CASEOPS_SUFFIX if self.caseops else ""
        self.data_path = self.data_path or f"./data/datasets/fineweb10B_sp{self.vocab_size}{variant}"
        self.tokenizer_path = self.tokenizer_path or f"./data/tokenizers/fineweb_{self.vocab_size}_bpe{variant}.model"

    def phase_set(self) -> set[str]:
        return {p.strip() for p in self.phases.split(",") if p.strip()}

    def seq_stages(self) -> list[tuple[float, int]]:
        """SEQ_SCHEDULE as (start fraction, training length) pairs; one stage of TRAIN_SEQ_LEN when it is empty."""
        if not self.seq_schedule.strip():
            return [(0.0, self.train_seq_len)]
        stages = [item.partition("@") for item in self.seq_schedule.replace(" ", "").split(",")]
        return [(float(start or 0), int(n)) for n, _, start in stages]

    def validate(self) -> None:
        """Every setting on its own; the model's shape only when training (PHASES=eval takes it from the artifact)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                need(math.isfinite(v) and v >= 0, f"{f.name.upper()}={v} must be a finite number >= 0")
        need(self.phase_set() in PHASE_SETS,
             f"PHASES={self.phases!r} must be one of: train,export,eval | train,export | eval")
        need(self.phase_set() != {"eval"} or bool(self.artifact_path or self.run_id),
             "PHASES=eval needs ARTIFACT_PATH (or the RUN_ID of the run that wrote <LOG_DIR>/<RUN_ID>.pgz)")
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult",
                     "iterations", "train_batch_tokens", "train_seq_len", "eval_seq_len", "eval_stride",
                     "eval_batch_windows", "train_log_every"):
            need(getattr(self, name) > 0, f"{name.upper()} must be > 0")
        need(self.val_tokens == 0 or self.val_tokens >= 2, "VAL_TOKENS must be 0 (all) or >= 2")
        need(self.eval_stride <= self.eval_seq_len,
             f"EVAL_STRIDE={self.eval_stride} must be <= EVAL_SEQ_LEN={self.eval_seq_len}")
        need(self.warmdown_frac <= 1 and self.late_qat_frac <= 1, "WARMDOWN_FRAC and LATE_QAT_FRAC must be <= 1")
        need(self.recur_start_frac < 1, "RECUR_START_FRAC must be < 1: the extra passes must train before the export")
        need(self.min_lr <= 1, f"MIN_LR={self.min_lr} must be a fraction of the peak LR in 0..1")
        need(self.muon_ns in NS_COEFFS, f"MUON_NS={self.muon_ns!r} must be one of {', '.join(NS_COEFFS)}")
        self.validate_seq_schedule()
        need(self.compile in DEVICE_CHOICES["compile"], f"COMPILE={self.compile!r} must be one of 1, 0, auto")
        need(self.autocast in DEVICE_CHOICES["autocast"], f"AUTOCAST={self.autocast!r} must be one of bf16, off, auto")
        need(self.ema_decay < 1, "EMA_DECAY must be < 1")
        need(self.slot_steps == 0 or self.slot_lr > 0, "SLOT_LR must be > 0 when SLOT_STEPS > 0")
        need(self.ttt_reset in ("never", "document"), f"TTT_RESET={self.ttt_reset!r} must be never or document")
        need(self.eval_mode in ("stream", "document"), f"EVAL_MODE={self.eval_mode!r} must be stream or document")
        need(self.lora_batch > 0 and self.phase_tokens > 0, "LORA_BATCH and PHASE_TOKENS must be > 0")
        need(self.lora_rank == 0 or self.lora_lr > 0, "LORA_LR must be > 0 when LORA_RANK > 0")
        need(self.lora_beta2 < 1, "LORA_BETA2 must be < 1")
        need(self.ttt_epochs == 0 or (self.ttt_lr > 0 and self.ttt_chunk_tokens > 0),
             "TTT_LR and TTT_CHUNK_TOKENS must be > 0 when TTT_EPOCHS > 0")
        need(self.gptq_damp > 0, "GPTQ_DAMP must be > 0")
        need(5 <= self.embed_bits <= 8, f"EMBED_BITS={self.embed_bits} must be 5..8 (the codes are stored as int8)")
        need(self.lqer_rank == 0 or (self.lqer_top > 0 and self.lqer_group > 0),
             "LQER_TOP and LQER_GROUP must be > 0 when LQER_RANK > 0")
        need(self.max_wallclock_seconds == 0 or self.gptq_reserve_seconds < self.max_wallclock_seconds,
             f"GPTQ_RESERVE_SECONDS={self.gptq_reserve_seconds} leaves no training time of "
             f"MAX_WALLCLOCK_SECONDS={self.max_wallclock_seconds}")
        if "train" in self.phase_set():
            self.validate_model()

    def validate_seq_schedule(self) -> None:
        """Lengths > 0 from increasing starts in [0, 1), the first from 0; the last is TRAIN_SEQ_LEN: the length the run
        ends at, the calibration's and the validation's."""
        try:
            stages = self.seq_stages()
        except ValueError:
            stages = []
        starts = [start for start, _ in stages]
        need(bool(stages) and starts[0] == 0 and starts[-1] < 1 and all(a < b for a, b in zip(starts, starts[1:]))
             and all(n > 0 for _, n in stages), f"SEQ_SCHEDULE={self.seq_schedule!r} must be lengths from increasing "
             "fractions of the run in [0, 1), the first from 0, e.g. 1024,2048@0.1,3072@0.7")
        need(stages[-1][1] == self.train_seq_len, f"SEQ_SCHEDULE={self.seq_schedule!r} ends at {stages[-1][1]} tokens "
             f"per sequence: TRAIN_SEQ_LEN={self.train_seq_len} must be that last length")

    def validate_model(self) -> None:
        need(self.model_dim % self.num_heads == 0,
             f"MODEL_DIM={self.model_dim} must be divisible by NUM_HEADS={self.num_heads}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"NUM_HEADS={self.num_heads} must be divisible by NUM_KV_HEADS={self.num_kv_heads}")
        head_dim = self.model_dim // self.num_heads
        need(self.rope_dims % 2 == 0 and self.rope_dims <= head_dim,
             f"ROPE_DIMS={self.rope_dims} must be even and <= head dim {head_dim}")
        need(self.vocab_size <= 65536, f"VOCAB_SIZE={self.vocab_size} does not fit the uint16 shards")
        need(self.bigram_vocab_size == 0 or self.bigram_vocab_size >= 2, "BIGRAM_VOCAB_SIZE must be 0 or >= 2")
        need(self.bigram_vocab_size == 0 or self.bigram_dim > 0, "BIGRAM_DIM must be > 0 when BIGRAM_VOCAB_SIZE > 0")
        for name, lo in (("recur_layers", 0), ("ve_layers", -self.num_layers)):
            layers = getattr(self, name)
            need(all(lo <= i < self.num_layers for i in layers),
                 f"{name.upper()}={layers} must name layers in {lo}..{self.num_layers - 1}")
            need(len({i % self.num_layers for i in layers}) == len(layers), f"{name.upper()}={layers} repeats a layer")
        need(not self.ve_layers or self.ve_dim > 0, "VE_DIM must be > 0 when VE_LAYERS is set")
        need(self.parallel_start < self.num_layers,
             f"PARALLEL_START={self.parallel_start} must be < NUM_LAYERS={self.num_layers} (0 = off)")
        loop = self.loop_layers
        consecutive = loop == tuple(range(loop[0], loop[0] + len(loop))) if loop else True
        need(consecutive and all(0 <= i < self.num_layers for i in loop),
             f"LOOP_LAYERS={loop} must be consecutive ascending layers in 0..{self.num_layers - 1}, e.g. 3,4,5")
        need(not loop or self.loop_passes >= 2, f"LOOP_PASSES={self.loop_passes} must be >= 2 (the passes in all)")
        shared = sorted(set(loop) & set(self.recur_layers))
        need(not shared, f"RECUR_LAYERS and LOOP_LAYERS share layer(s) {shared}: a layer repeats alone or in the loop")
        need(self.smear_gate in ("vector", "input"), f"SMEAR_GATE={self.smear_gate!r} must be vector or input")
        need(not (self.attn_gate or self.smear_gate == "input") or 0 < self.gate_dims <= self.model_dim,
             f"GATE_DIMS={self.gate_dims} must be in 1..MODEL_DIM={self.model_dim}")
        need(not self.attn_gate or self.attn_gate_scale > 0, "ATTN_GATE_SCALE must be > 0 when ATTN_GATE is on")


# Fields that describe the network (and the text it reads: CaseOps): stored in the artifact so PHASES=eval rebuilds
# exactly what was trained and scores it with the tokenizer and byte rule it was trained for.
MODEL_FIELDS = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "rope_dims",
                "rope_base", "qk_gain_init", "logit_softcap", "bigram_vocab_size", "bigram_dim", "recur_layers",
                "ve_dim", "ve_layers", "parallel_start", "ln_scale", "caseops", "doc_attention", "loop_layers",
                "loop_passes", "attn_gate", "attn_gate_scale", "gate_dims", "smear_gate")
# What an artifact written before a model field existed was trained with (read_artifact fills them in)
MODEL_FIELDS_BEFORE = {"doc_attention": False, "loop_layers": (), "loop_passes": 3, "attn_gate": False,
                       "attn_gate_scale": 0.5, "gate_dims": 12, "smear_gate": "vector"}

# COMPILE and AUTOCAST: what each value means on (CUDA, CPU). "auto" is the device's default; a CPU run given
# COMPILE=1 AUTOCAST=bf16 traces and compiles what a GPU run does, with the CPU's kernels (SDPA, foreach AdamW).
DEVICE_CHOICES = {"compile": {"auto": (True, False), "1": (True, True), "0": (False, False)},
                  "autocast": {"auto": (torch.bfloat16, None), "bf16": (torch.bfloat16,) * 2, "off": (None, None)}}

# Common variables of other software that look like ours (NUM_THREADS ~ NUM_HEADS): never an error.
OTHER_SOFTWARE = {"NUM_THREADS"}

# Names other submissions (or earlier versions of this script) use: a copied launch command fails loudly.
# A plain literal: tools/gpu_check.py reads it from the source with ast.literal_eval (no torch there).
NOT_OURS = {"WARMDOWN_ITERS": "use WARMDOWN_FRAC (a fraction of the expected run)",
            "EVAL_BATCH_SEQS": "use EVAL_BATCH_WINDOWS",
            "NUM_LOOPS": "use LOOP_PASSES, its value + 1 (the passes in all), with LOOP_LAYERS; RECUR_LAYERS repeats "
                         "single layers",
            "LOOP_START": "use LOOP_LAYERS, the segment's layers listed: 3,4,5 for LOOP_START=3 LOOP_END=5",
            "LOOP_END": "use LOOP_LAYERS, the segment's layers listed: 3,4,5 for LOOP_START=3 LOOP_END=5",
            "ENABLE_LOOPING_AT": "use RECUR_START_FRAC (it switches on every extra pass)",
            "SPARSE_ATTN_GATE_ENABLED": "use ATTN_GATE", "SPARSE_ATTN_GATE_SCALE": "use ATTN_GATE_SCALE",
            "GATE_WINDOW": "use GATE_DIMS", "SMEAR_GATE_ENABLED": "use SMEAR_GATE=input (#1667's gate; vector: seed's)",
            "GATED_ATTN_QUANT_GATE": "the weights of ATTN_GATE are always stored int8 per row",
            "LATE_QAT_THRESHOLD": "use LATE_QAT_FRAC", "QAT_ENABLED": "use LATE_QAT_FRAC (0 = off)",
            "SLOT_ENABLED": "use SLOT_STEPS (0 = plain sliding window; SLOT is on by default)",
            "TTT_ENABLED": "use TTT_EPOCHS (0 = off; score-first TTT)", "TTT_STEPS": "use TTT_EPOCHS",
            "TTT_LORA": "use EVAL_MODE=document (per-document LoRA TTT; LORA_RANK=0 turns it off)",
            "TTT_LORA_RANK": "use LORA_RANK (EVAL_MODE=document)", "TTT_LORA_LR": "use LORA_LR (EVAL_MODE=document)",
            "TTT_CHUNK_SIZE": "use EVAL_STRIDE in EVAL_MODE=document (the chunk), TTT_CHUNK_TOKENS in stream mode",
            "PHASED_TTT_PREFIX_DOCS": "use PHASE_DOCS", "PHASED_TTT_NUM_PHASES": "use PHASE_COUNT",
            "GLOBAL_TTT_LR": "use PHASE_LR", "TTT_BATCH_SIZE": "use LORA_BATCH",
            "QUANTIZER": "the export is always GPTQ (tools/quant_study.py keeps round to nearest as its reference)",
            "SWA_ENABLED": "this script has no SWA; it exports the EMA weights (EMA_DECAY)",
            "NUM_ITERATIONS": "use ITERATIONS", "TRAIN_STEPS": "use ITERATIONS", "WARMUP_ITERS": "use WARMUP_STEPS",
            "MAX_WALLCLOCK": "use MAX_WALLCLOCK_SECONDS", "MLP_RATIO": "use MLP_MULT",
            "SLOT_OPTIMIZER": "SLOT always uses AdamW (see logs/eval_study/README.md)",
            "TRAIN_SEQ_SCHEDULE": "use SEQ_SCHEDULE (start fractions: #2014's 1024@0.1,2048@0.7,3072@1 is "
                                  "1024,2048@0.1,3072@0.7)", "SEQ_CHANGE_WARMUP_STEPS": "use SEQ_REWARM_STEPS",
            # the rest of the #1855 / #2014 / #2135 launch commands
            "LQER_ENABLED": "use LQER_RANK (0 = off)", "LQER_TOP_K": "use LQER_TOP",
            "LQER_ASYM_GROUP": "use LQER_GROUP",
            "LQER_FACTOR_BITS": "LQER's factors are always A int2 and B int4 in groups (#1797's asymmetric form)",
            "LQER_ASYM_ENABLED": "LQER's factors are always asymmetric (A int2, B int4 in LQER_GROUP groups)",
            "AWQ_LITE_ENABLED": "use AWQ_GROUP (0 = off)", "AWQ_LITE_GROUP_SIZE": "use AWQ_GROUP",
            "AWQ_LITE_BITS": "AWQ_GROUP's salient group always gets 127 levels a side (#1908's 8 bits)",
            "AWQ_LITE_GROUP_TOP_K": "AWQ_GROUP picks one group for the model (#1908's top 1)",
            "COMPRESSOR": "every compressor runs and the smallest is kept; PACK_GROUPS=1 is #1855's per-group layout",
            "MATRIX_CLIP_SIGMAS": "use INT6_CLIP_K", "ATTN_CLIP_SIGMAS": "use INT6_CLIP_K",
            "MLP_CLIP_SIGMAS": "use MLP_CLIP_K", "EMBED_CLIP_SIGMAS": "use EMBED_CLIP_K",
            "MATRIX_BITS": "the block matrices are always int6 (INT6_CLIP_K is the size knob)",
            "GPTQ_CALIBRATION_BATCHES": "use GPTQ_CALIB_BATCHES",
            "MUON_BACKEND_STEPS": "Newton-Schulz always runs 5 steps; MUON_NS picks their coefficients",
            "EMBED_LR": "use TIED_EMBED_LR (the embedding is tied)", "TIE_EMBEDDINGS": "the embedding is always tied",
            "EMBED_WD": "use ADAM_WD (the embeddings' decay; scalars are never decayed here)",
            "PARALLEL_START_LAYER": "use PARALLEL_START (#1204's parallel residuals, not #1530's two lanes)",
            "XSA_LAST_N": "XSA runs on every layer",
            "SKIP_GATES_ENABLED": "the U-Net skips always have learned weights",
            "ROPE_TRAIN_SEQ_LEN": "this RoPE has no train length (no YaRN)", "CASEOPS_ENABLED": "use CASEOPS",
            "DATA_DIR": "use DATA_PATH", "VAL_BATCH_TOKENS": "use EVAL_BATCH_WINDOWS",
            "TTT_EVAL_SEQ_LEN": "use EVAL_SEQ_LEN (one context for every eval path)",
            "TTT_BETA2": "use LORA_BETA2", "TTT_WEIGHT_DECAY": "use LORA_WEIGHT_DECAY",
            "TTT_LORA_ALPHA": "use LORA_ALPHA",
            "TTT_WARM_START_A": "use LORA_CARRY", "GLOBAL_TTT_MOMENTUM": "use PHASE_MOMENTUM",
            "TTT_K_LORA": "the document LoRA always adapts Q, K, V, O, the MLP and the head",
            "TTT_Q_LORA": "the document LoRA always adapts Q, K, V, O, the MLP and the head",
            "TTT_V_LORA": "the document LoRA always adapts Q, K, V, O, the MLP and the head",
            "TTT_MASK": "the document LoRA always adapts Q, K, V, O, the MLP and the head",
            "FUSED_CE_ENABLED": "this script has no fused cross-entropy kernel",
            "ASYM_LOGIT_RESCALE": "not built: a no-op in #1945-#2135 (its two parameters are in no optimizer)",
            "NGRAM_TILT_ENABLED": "this script has no n-gram tilt (#2130, #2135)",
            "EVAL_INCLUDE_TAIL": "every val target is always scored"}


def parse_setting(name: str, text: str, hint) -> object:
    text = text.strip()
    try:
        if hint is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
        if hint is str:
            return text
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)   # tuple[int, ...]
    except ValueError:
        raise RunError(f"{name}={text!r} is not a valid {getattr(hint, '__name__', 'list of ints')}") from None


def config_from_env(env: typing.Mapping[str, str]) -> tuple[Config, set[str]]:
    """Apply env overrides to the defaults; a name close to one of ours is an error that names the right one."""
    hints = typing.get_type_hints(Config)
    ours = {f.name.upper(): f.name for f in dataclasses.fields(Config)}
    for key in env:
        if key in NOT_OURS:
            raise RunError(f"{key} is not a setting of this script: {NOT_OURS[key]}")
        if key not in ours and key not in OTHER_SOFTWARE:
            close = difflib.get_close_matches(key, list(ours), n=1, cutoff=0.85)
            if close:
                raise RunError(f"unknown setting {key}={env[key]!r}: did you mean {close[0]}?")
    values = {ours[k]: parse_setting(k, v, hints[ours[k]]) for k, v in env.items() if k in ours}
    cfg = Config(**values)
    cfg.validate()
    return cfg, set(values)


# ==================================================================================================
# Model: one block loop for training, evaluation, SLOT and TTT; every parameter labelled once
# ==================================================================================================

# Every parameter carries one label; this table maps it to its optimizer, learning rate, weight decay and storage.
# label: (optimizer, learning-rate field, weight-decay field or None, storage in the artifact)
PARAM_TABLE = {
    "matrix": ("muon", "matrix_lr", "muon_wd", "int6"),
    "embed": ("adam", "tied_embed_lr", "adam_wd", "int8"),
    "bigram": ("adam", "tied_embed_lr", "adam_wd", "int6"),
    "value_embed": ("adam", "tied_embed_lr", "adam_wd", "int8"),
    "scalar": ("adam", "scalar_lr", None, "fp16"),
    "recur": ("adam", "scalar_lr", None, "fp32"),    # iter_embed / iter_gate: fp32, no decay (the -2 gate must hold)
    "attn_gate": ("adam", "scalar_lr", "adam_wd", "int8"),   # ATTN_GATE's W: scalar AdamW, int8 per row (#1736, #1855)
}


def labelled(p: torch.Tensor, label: str) -> nn.Parameter:
    assert label in PARAM_TABLE, label
    p = p if isinstance(p, nn.Parameter) else nn.Parameter(p)
    p.label = label
    return p


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def fake_quant_rows(w: torch.Tensor, qmax: int, clip_k: float = 0.0) -> torch.Tensor:
    """w on the export's grid (rounded to nearest): what late QAT trains through."""
    scale = row_scales(w.detach(), qmax, clip_k)[:, None].to(w.dtype)
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


class QLinear(nn.Module):
    """A bias-free linear layer exported as int6. Late QAT is a Python flag: torch.compile guards on it, so each
    setting gets its own graph (both are compiled in the warm-up) and QAT off costs nothing. When on, the weight is
    w + (fake_int6(w) - w).detach(): the int6 grid forward, a straight-through gradient backward."""

    def __init__(self, in_features: int, out_features: int, label: str = "matrix", init: str = "orthogonal") -> None:
        super().__init__()
        w = torch.empty(out_features, in_features)
        nn.init.orthogonal_(w) if init == "orthogonal" else nn.init.zeros_(w)
        self.weight = labelled(w, label)
        self.qat, self.clip_k = False, Config.int6_clip_k   # the export's clip rule: QAT trains on the exported grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.qat:
            w = w + (fake_quant_rows(w, INT6_MAX, self.clip_k) - w).detach()
        return F.linear(x, w)


class Rotary(nn.Module):
    """Partial RoPE: rotate the first `dims` of each head, leave the rest position-free."""

    def __init__(self, dims: int, base: float) -> None:
        super().__init__()
        self.dims = dims
        inv_freq = 1.0 / base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # [B, T, H, D]
        if self.dims == 0:
            return x
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        x1, x2, rest = x[..., :self.dims // 2], x[..., self.dims // 2:self.dims], x[..., self.dims:]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, rest), dim=-1)


# How the records install FlashAttention-3 for the official image (torch 2.9.1, CUDA 12.8); PyPI's flash_attn_3 0.0.0
# is an empty placeholder
FA3_INSTALL = ("pip install flash_attn_3 --no-deps --find-links "
               "https://windreamer.github.io/flash-attention3-wheels/cu128_torch291/")


def flash_attention_problem(cfg: Config, device: torch.device) -> str | None:
    """Why FlashAttention-3 can't be used here (None: use it). It needs a Hopper GPU (its kernels are built for sm90),
    and one small forward and backward at the model's head shape must agree with SDPA: a wheel built for another
    torch, or without backward kernels for this head dim, fails here rather than inside the run. With DOC_ATTENTION
    the probe's rows hold documents (one starting mid-row, BOS runs, one row without a BOS): the varlen call is
    checked against SDPA's mask."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return "not a Hopper GPU"
    try:
        import flash_attn_interface  # noqa: F401  (FlashAttention-3; not on PyPI)
    except Exception as e:   # an optional speedup: any failure means the portable path
        return f"flash_attn_interface does not import: {type(e).__name__}: {e}"
    hd = cfg.model_dim // cfg.num_heads
    idx = torch.full((2, 256), BOS_ID + 1, device=device)
    idx[0, [0, 60, 61, 62, 200]] = BOS_ID
    try:
        with torch.enable_grad():
            outs = []
            for backend in ("fa3", "sdpa"):
                torch.manual_seed(0)
                qkv = [torch.randn(2, 256, h, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
                       for h in (cfg.num_heads, cfg.num_kv_heads, cfg.num_kv_heads)]
                y = causal_attention(*qkv, backend, document_mask(idx, backend) if cfg.doc_attention else None)
                y.float().square().sum().backward()
                outs.append([y.detach().float()] + [t.grad.float() for t in qkv])
        # worst error of the output and each gradient relative to its largest value (bf16 vs fp32 SDPA on CPU: <0.5%)
        gap = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(*outs))
    except Exception as e:
        return f"flash_attn_func{'_varlen' * cfg.doc_attention} failed: {type(e).__name__}: {e}"
    return None if gap < 0.05 else f"flash_attn_func disagrees with SDPA (relative gap {gap:.3g})"


# FlashAttention-3's sequences per batch: one per row and one per DOC_MIN_TOKENS tokens. Each is a batch entry of its
# backward grid (most CTAs of a short or empty one exit at once); FineWeb's documents average ~1,150 tokens (val)
DOC_MIN_TOKENS = 64


def document_mask(idx: torch.Tensor, backend: str) -> torch.Tensor:
    """What keeps attention inside each document (a BOS starts one), built once per forward for every layer:
    FlashAttention-3's cu_seqlens over the flattened batch, or SDPA's [B, 1, T, T] boolean mask (s <= t, same doc)."""
    if backend == "fa3":
        return document_starts(idx)
    docs = torch.cumsum(idx == BOS_ID, dim=1)
    causal = torch.ones(idx.size(1), idx.size(1), dtype=torch.bool, device=idx.device).tril()
    return (docs[:, None, :, None] == docs[:, None, None, :]) & causal


def document_starts(idx: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32) of the flattened batch: a sequence starts at every BOS and at every row start. Static size
    for torch.compile, rows + B*T / DOC_MIN_TOKENS + 1 entries; the padding repeats B*T (zero-length sequences). More
    starts than that stop the run (a device assert) rather than merge two documents."""
    start = idx == BOS_ID
    start[:, 0] = True
    total, cap = start.numel(), idx.size(0) + start.numel() // DOC_MIN_TOKENS
    torch._assert_async(start.sum() <= cap, "DOC_ATTENTION: more documents than FlashAttention-3's cu_seqlens hold")
    starts = torch.nonzero_static(start.flatten(), size=cap, fill_value=total).flatten()
    return F.pad(starts, (0, 1), value=total).to(torch.int32)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal GQA attention on [B, T, H, D] tensors (k, v with fewer heads), inside documents when given
    document_mask's mask for this backend."""
    if backend == "fa3" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        if mask is None:
            from flash_attn_interface import flash_attn_func
            out = flash_attn_func(q, k, v, causal=True)
        else:
            from flash_attn_interface import flash_attn_varlen_func
            T = q.size(1)      # the longest document a row can hold
            out = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask, mask, T, T,
                                         causal=True)
        out = out[0] if isinstance(out, tuple) else out
        return out.view(q.shape)
    assert mask is None or mask.dim() == 4, "FlashAttention-3's document starts reached SDPA (not bf16 on CUDA?)"
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=mask is None, enable_gqa=True)
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: Config, value_residual: bool, backend: str) -> None:
        super().__init__()
        d, self.h, self.hkv = cfg.model_dim, cfg.num_heads, cfg.num_kv_heads
        self.hd, self.backend = d // cfg.num_heads, backend
        self.c_q = QLinear(d, d)
        self.c_k = QLinear(d, self.hkv * self.hd)
        self.c_v = QLinear(d, self.hkv * self.hd)
        self.proj = QLinear(d, d, init="zeros")
        self.q_gain = labelled(torch.full((self.h,), cfg.qk_gain_init), "scalar")
        self.rotary = Rotary(cfg.rope_dims, cfg.rope_base)
        # value residual (ResFormer): v <- v + sigmoid(g) (v0 - v) with layer 0's values v0; g = -1.5 mixes in 18%
        # (#1278). Layer 0 has none (it would be unused)
        self.vr = labelled(torch.full((1,), -1.5), "scalar") if value_residual else None
        # SparseAttnGate (#1787, #1855): W [heads, GATE_DIMS] from zero; 2 x sigmoid makes the zero init the identity
        self.gate = labelled(torch.zeros(self.h, cfg.gate_dims), "attn_gate") if cfg.attn_gate else None
        self.gate_scale, self.gate_dims = cfg.attn_gate_scale, cfg.gate_dims

    def forward(self, x: torch.Tensor, v0: torch.Tensor | None, ve: torch.Tensor | None,
                mask: torch.Tensor | None, ad: "PassAdapters | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.c_q(x) + ad("q", x) if ad else self.c_q(x)
        k = self.c_k(x) + ad("k", x) if ad else self.c_k(x)
        v = self.c_v(x) + ad("v", x) if ad else self.c_v(x)
        q, k = q.view(B, T, self.h, self.hd), k.view(B, T, self.hkv, self.hd)
        v = (v if ve is None else v + ve).view(B, T, self.hkv, self.hd)
        if self.vr is None:
            v0 = v
        else:
            v = v + torch.sigmoid(self.vr).to(v.dtype) * (v0 - v)
        # CUDA autocast runs rms_norm in fp32 from torch 2.12 on: bring q and k back to the values' (compute) dtype,
        # or FlashAttention-3 would be skipped for fp32 inputs
        dt = v.dtype
        q = self.rotary(rms_norm(q).to(dt)) * self.q_gain.to(dt)[None, None, :, None]
        k = self.rotary(rms_norm(k).to(dt))
        y = causal_attention(q, k, v, self.backend, mask)
        # XSA (exclusive self attention): remove from each head's output its component along its own token's value
        g = y.view(B, T, self.hkv, self.h // self.hkv, self.hd)
        vn = F.normalize(v, dim=-1).unsqueeze(3)
        y = g - (g * vn).sum(-1, keepdim=True) * vn
        if self.gate is not None:   # after XSA, before proj, from this token's normed input alone (#1855)
            gate = 2 * torch.sigmoid(self.gate_scale * F.linear(x[..., :self.gate_dims], self.gate.to(x.dtype)))
            y = y * gate.view(B, T, self.hkv, self.h // self.hkv, 1)
        y = y.reshape(B, T, self.h * self.hd)
        return (self.proj(y) + ad("o", x) if ad else self.proj(y)), v0   # the output adapter reads the block's input


class MLP(nn.Module):
    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.fc = QLinear(cfg.model_dim, cfg.mlp_mult * cfg.model_dim)
        self.proj = QLinear(cfg.mlp_mult * cfg.model_dim, cfg.model_dim, init="zeros")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.leaky_relu(self.fc(x), negative_slope=0.5).square())   # LeakyReLU(0.5)^2: PR #493


@dataclass(frozen=True)
class Pass:
    """One pass of the block loop: which physical block runs, and the per-pass techniques (data, not flags)."""
    layer: int            # physical block
    repeat: int = -1      # >= 0: an extra pass, conditioned by iter_embed / iter_gate[repeat] (RECUR_/LOOP_LAYERS)
    ln: float = 1.0       # LN scale: the block's normalised inputs x this
    ve: int = -1          # >= 0: add the value embedding, scaled by ve_scales[ve]
    parallel: bool = False   # attention and MLP read the same input and both add to the stream (#1204, #1493)


class Block(nn.Module):
    def __init__(self, cfg: Config, index: int, backend: str) -> None:
        super().__init__()
        d = cfg.model_dim
        self.attn = Attention(cfg, value_residual=index > 0, backend=backend)
        self.mlp = MLP(cfg)
        self.attn_scale = labelled(torch.ones(d), "scalar")
        self.mlp_scale = labelled(torch.ones(d), "scalar")
        self.resid_mix = labelled(torch.stack((torch.ones(d), torch.zeros(d))), "scalar")   # x <- a x + b x0

    def forward(self, x, x0, v0, p: Pass, ve, mask, ad: "PassAdapters | None" = None):
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        n = rms_norm(x) * p.ln
        a, v0 = self.attn(n, v0, ve, mask, ad)
        if p.parallel:
            m = self.mlp(n) + ad("m", n) if ad else self.mlp(n)
            return x + self.attn_scale.to(x.dtype) * a + self.mlp_scale.to(x.dtype) * m, v0
        x = x + self.attn_scale.to(x.dtype) * a
        n = rms_norm(x) * p.ln
        m = self.mlp(n) + ad("m", n) if ad else self.mlp(n)
        return x + self.mlp_scale.to(x.dtype) * m, v0


def doc_continues(idx: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: position t>0 whose token is not BOS, i.e. token t-1 belongs to the same document."""
    keep = idx != BOS_ID
    keep[:, 0] = False
    return keep


class BigramHash(nn.Module):
    """Embedding of a hash of (previous token, token); a BOS gets the 'no bigram' bucket. As PR #1278: a zero table
    times a learned scalar (init 0.05), projected to the model width by a Muon matrix where the table is narrower."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.buckets, dim, width = cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim
        self.embed = labelled(torch.zeros(self.buckets, dim), "bigram")
        self.proj = QLinear(dim, width) if dim != width else None
        self.scale = labelled(torch.full((1,), 0.05), "scalar")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(idx[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1)
        h = torch.where(doc_continues(idx), h, self.buckets - 1)
        out = F.embedding(h, self.embed)
        out = self.proj(out) if self.proj is not None else out
        return out * self.scale.to(out.dtype)


class ValueEmbed(nn.Module):
    """A second token table [V, ve_dim], projected to the KV width and added to the values of VE_LAYERS, each pass
    with its own learned scale (PR #1278: VE_DIM=128, VE_LAYERS=9,10)."""

    def __init__(self, cfg: Config, n_scales: int) -> None:
        super().__init__()
        kv_width = cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        self.embed = labelled(torch.randn(cfg.vocab_size, cfg.ve_dim) * 0.01, "value_embed")
        self.proj = QLinear(cfg.ve_dim, kv_width)
        self.scales = labelled(torch.full((n_scales,), 0.1), "scalar")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.proj(F.embedding(idx, self.embed))


class SmearGate(nn.Module):
    """SMEAR_GATE=vector, on the normed embedding: x_t += sigmoid(gate) * (x_{t-1} - x_t) inside a document; a BOS keeps
    its own vector (no cross-document leak)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = labelled(torch.zeros(width), "scalar")

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0))
        g = torch.sigmoid(self.gate).to(x.dtype) * doc_continues(idx).unsqueeze(-1).to(x.dtype)
        return x + g * (prev - x)


class InputSmearGate(nn.Module):
    """SMEAR_GATE=input, on the raw embedding before the norm (#1667): x_t += lam * sigmoid(W x_t[:GATE_DIMS]) *
    x_{t-1} inside a document (#1855's BOS fix); lam and W start at 0, so it starts as the identity."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.dims = cfg.gate_dims
        self.weight = labelled(torch.zeros(1, cfg.gate_dims), "scalar")
        self.lam = labelled(torch.zeros(1), "scalar")

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * doc_continues(idx).unsqueeze(-1).to(x.dtype)
        g = self.lam.to(x.dtype) * torch.sigmoid(F.linear(x[..., :self.dims], self.weight.to(x.dtype)))
        return x + g * prev


def layer_schedule(cfg: Config) -> list[Pass]:
    """The passes: RECUR_LAYERS=4,5 on 11 layers runs 0,1,2,3,4,4',5,5',6,...,10; LOOP_LAYERS=3,4,5 (LOOP_PASSES=3,
    RECUR_LAYERS empty) runs 0,1,2,3,4,5,3',4',5',3'',4'',5'',6,...,10 (#1855's order). Each pass carries its per-pass
    techniques; each extra pass its own iter_embed row: RECUR_LAYERS' first (as older artifacts), then the loop's."""
    order, rows = [], len(cfg.recur_layers)
    for layer in range(cfg.num_layers):
        order.append((layer, -1))
        if layer in cfg.recur_layers:
            order.append((layer, cfg.recur_layers.index(layer)))
        if cfg.loop_layers and layer == cfg.loop_layers[-1]:
            for _ in range(cfg.loop_passes - 1):
                order += [(i, rows + k) for k, i in enumerate(cfg.loop_layers)]
                rows += len(cfg.loop_layers)
    passes, n_ve, ve_layers = [], 0, {i % cfg.num_layers for i in cfg.ve_layers}
    for layer, rep in order:
        ve = -1
        if layer in ve_layers:
            ve, n_ve = n_ve, n_ve + 1
        ln = 1 / math.sqrt(layer + 1) if cfg.ln_scale else 1.0    # by physical layer: all its passes share it
        passes.append(Pass(layer, rep, ln, ve, 0 < cfg.parallel_start <= layer))
    return passes


class GPT(nn.Module):
    """Training, evaluation and SLOT all go through hidden() then head(): one forward path."""

    def __init__(self, cfg: Config, attention: str = "sdpa") -> None:
        super().__init__()
        d = cfg.model_dim
        self.softcap = cfg.logit_softcap
        self.attention, self.doc_attention = attention, cfg.doc_attention
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.tok_emb.weight = labelled(torch.randn(cfg.vocab_size, d) * 0.005, "embed")
        self.bigram = BigramHash(cfg) if cfg.bigram_vocab_size else None
        self.smear = InputSmearGate(cfg) if cfg.smear_gate == "input" else SmearGate(d)
        self.blocks = nn.ModuleList(Block(cfg, i, attention) for i in range(cfg.num_layers))
        self.schedule = layer_schedule(cfg)
        self.first_passes = [p for p in self.schedule if p.repeat < 0]   # what runs before RECUR_START_FRAC
        n_ve = sum(p.ve >= 0 for p in self.schedule)
        self.value_embed = ValueEmbed(cfg, n_ve) if n_ve else None
        n_enc = len(self.schedule) // 2               # U-Net: the first half of the passes feed the second half
        n_skip = min(n_enc, len(self.schedule) - n_enc)
        self.skip_weights = labelled(torch.ones(n_skip, d), "scalar")
        n_rep = sum(p.repeat >= 0 for p in self.schedule)
        self.iter_embed = labelled(torch.randn(n_rep, d) * 0.02, "recur") if n_rep else None   # PR #1278
        self.iter_gate = labelled(torch.full((n_rep, d), -2.0), "recur") if n_rep else None
        # RECUR_START_FRAC: before the switch the extra passes are skipped (11 passes, the plain model's U-Net). A
        # Python flag, like QAT: torch.compile guards on it, and the warm-up compiles both graphs
        self.recur_on = True

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """The only place neighbouring tokens mix before attention; both mixers stop at a BOS. Under autocast the
        residual stream leaves here in the compute dtype (bf16 on CUDA); the master weights stay fp32."""
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        if isinstance(self.smear, InputSmearGate):   # it smears before the norm, as #1667 and #1855
            x = rms_norm(self.smear(x, idx))
        else:
            x = self.smear(rms_norm(x), idx)
        device = idx.device.type
        return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x

    def hidden(self, idx: torch.Tensor, lora: "Adapters | None" = None) -> torch.Tensor:
        """Token ids [B, T] -> final residual stream [B, T, d] (before the final norm): the one block loop of
        training, evaluation, SLOT and TTT; `lora`: per-document adapters (one per row) of the document eval."""
        x = self.embed(idx)
        ve = self.value_embed(idx) if self.value_embed is not None else None
        mask = document_mask(idx, self.attention) if self.doc_attention else None
        x0, v0, skips = x, None, []
        passes = self.schedule if self.recur_on else self.first_passes
        n_enc = len(passes) // 2          # U-Net over the passes that run: the skips re-pair at the switch (#1394)
        for i, p in enumerate(passes):
            if p.repeat >= 0:   # an extra pass of a layer: per-pass conditioning
                x = x + torch.sigmoid(self.iter_gate[p.repeat]).to(x.dtype) * self.iter_embed[p.repeat].to(x.dtype)
            if 0 <= i - n_enc < min(n_enc, len(passes) - n_enc):
                x = x + self.skip_weights[i - n_enc].to(x.dtype) * skips.pop()
            ve_p = ve * self.value_embed.scales[p.ve].to(ve.dtype) if p.ve >= 0 else None
            x, v0 = self.blocks[p.layer](x, x0, v0, p, ve_p, mask, lora.at(i) if lora is not None else None)
            if i < n_enc:
                skips.append(x)
        return x

    def head(self, h: torch.Tensor, lora: "Adapters | None" = None) -> torch.Tensor:
        """Final norm, tied LM head (plus the document adapters' head term) and logit soft-cap, in float32."""
        n = rms_norm(h)
        logits = F.linear(n, self.tok_emb.weight.to(h.dtype))
        logits = logits + lora.head(n) if lora is not None else logits
        logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits   # float64 stays
        return self.softcap * torch.tanh(logits / self.softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        logits = self.head(self.hidden(idx))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)

    def set_qat(self, on: bool, spec: "QuantSpec | None" = None) -> None:
        """Late QAT on or off; each matrix trains on the grid of its own clip rule (clip_rule: MLP_CLIP_K or not)."""
        for name, m in self.named_modules():
            if isinstance(m, QLinear):
                m.qat, m.clip_k = on, clip_rule(f"{name}.weight", "int6", spec or QuantSpec())


def param_labels(model: nn.Module) -> dict[str, str]:
    """name -> label for every parameter; asserts each is labelled exactly once (tied weights appear once)."""
    labels = {name: getattr(p, "label", None) for name, p in model.named_parameters()}
    missing = [n for n, lab in labels.items() if lab not in PARAM_TABLE]
    assert not missing, f"parameters without a label in PARAM_TABLE: {missing}"
    return labels


def build_model(cfg: Config, run: Run) -> GPT:
    """The seeded model on the run's device, with FlashAttention-3 where it works (a Hopper GPU), else SDPA."""
    problem = flash_attention_problem(cfg, run.device) or (None if run.amp else "AUTOCAST=off: it needs bf16 inputs")
    # rank agreement: every rank runs the same attention, so that every rank traces the same graphs
    sdpa = run.agree(problem is not None)
    why = f"(FlashAttention-3 unusable: {problem or 'on another rank'})" if sdpa else "(FlashAttention-3)"
    log(f"attention_kernel:{'sdpa' if sdpa else 'fa3'} {why}")
    if sdpa and run.device.type == "cuda" and run.world_size == REFERENCE_GPUS and cfg.max_wallclock_seconds >= 600:
        log("attention_kernel: WARNING a record-length run on SDPA: about 14% fewer steps than with FlashAttention-3 "
            f"(PR #1006: 107 vs 92 ms/step on 8 x H100). Install it: {FA3_INSTALL}")
    if sdpa and run.device.type == "cuda" and cfg.doc_attention:
        log("attention_kernel: WARNING DOC_ATTENTION on SDPA: a dense [B, 1, T, T] mask, no flash kernel (projected "
            "cost: logs/doc_attention/README.md)")
    torch.manual_seed(cfg.seed)
    return GPT(cfg, attention="sdpa" if sdpa else "fa3").to(run.device)


# ==================================================================================================
# Optimizers: Muon for block matrices, AdamW for the rest
# ==================================================================================================

# MUON_NS: the (a, b, c) of each quintic step x <- a x + b (x x^T) x + c (x x^T)^2 x, one tuple per step. Where
# they take singular values of 1e-3..1 (x scaled by its Frobenius norm): jordan to 0.47-1.20, polar to 0.859-1.141
NS_COEFFS = {
    "jordan": ((3.4445, -4.7750, 2.0315),) * 5,    # Muon (K. Jordan 2024): one tuple, five times
    # Polar Express (arXiv 2505.16932; #1344, #1787, #1855): minimax per step, made for 5 (safety 2e-2, cushion 2)
    "polar": ((8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
}


def newton_schulz(g: torch.Tensor, coeffs: tuple = NS_COEFFS["jordan"], dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """Approximate the orthogonal factor U V^T of each matrix in g [N, m, n] with quintic Newton-Schulz steps (one
    per `coeffs` tuple: constants of the compiled graph) in `dtype`; same-shape matrices go through one batched matmul
    chain. Scaled by the Frobenius norm, as the records do (nanochat's 1.02 margin is not applied)."""
    x = g.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    for a, b, c in coeffs:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    return x.mT if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, row normalisation (MuonEq-R, arXiv 2603.28254), Newton-Schulz orthogonalisation and
    decoupled weight decay, sharded across the ranks without DDP (#1204, #2135). Same-shape matrices form a bank; a
    bank's gradients are reduce-scattered in the compute dtype, so each rank holds the summed gradients of its
    1/world of the bank, keeps momentum for those alone and orthogonalises them in one batched call; the updates are
    all-gathered asynchronously while the next bank is orthogonalised."""

    def __init__(self, params, lr: float, momentum: float, weight_decay: float, run: Run,
                 coeffs: tuple = NS_COEFFS["jordan"]) -> None:
        super().__init__(list(params), dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.run, self.coeffs = run, coeffs
        by_shape: dict[tuple, list[nn.Parameter]] = {}
        for p in self.param_groups[0]["params"]:
            by_shape.setdefault(tuple(p.shape), []).append(p)
        self.banks = list(by_shape.values())
        # the exchange and the orthogonalisation run in the compute dtype (the weights' own without autocast)
        self.dtype = run.amp or self.param_groups[0]["params"][0].dtype
        self.buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if run.compiled:   # one graph per bank shape: more than dynamo's default limit of 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 + len(self.banks))
        self.ns = run.compile(newton_schulz, fullgraph=True)   # a graph break is an error, not a silent slowdown
        self.works: list = []

    def _buffers(self):
        """Per bank: its gradients padded to a multiple of world_size, this rank's shard, the gathered updates."""
        if self.buffers is None:
            world, self.buffers = self.run.world_size, []
            for bank in self.banks:
                rows = -(-len(bank) // world) * world
                full = torch.zeros(rows, *bank[0].shape, device=bank[0].device, dtype=self.dtype)
                shard = full if world == 1 else full.new_zeros(rows // world, *bank[0].shape)
                self.buffers.append((full, shard, full if world == 1 else torch.zeros_like(full)))
        return self.buffers

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Start the reduce-scatter of every bank's gradients (summed over ranks: the caller scales by 1/world)."""
        for bank, (full, shard, _) in zip(self.banks, self._buffers()):
            grads = [p.grad for p in bank]
            if any(g is None for g in grads):
                full.zero_()
            rows = [(row, g) for row, g in zip(full.unbind(0), grads) if g is not None]
            torch._foreach_copy_([r for r, _ in rows], [g for _, g in rows])
            self.works.append(self.run.start_reduce_scatter(shard, full))

    @torch.no_grad()
    def shard_square_norm(self) -> torch.Tensor:
        """Wait for the reduce-scatters; the squared norm of this rank's summed gradient rows (for the global clip)."""
        for work in self.works:
            self.run.wait(work, "reduce_scatter")
        self.works = []
        return sum(shard.to(bank[0].dtype).square().sum() for bank, (_, shard, _) in zip(self.banks, self._buffers()))

    @torch.no_grad()
    def step(self, scale: torch.Tensor | float | None = None) -> None:
        """Update every matrix from the reduced gradients times `scale` (1/world and the clip, on the device), as
        optimizer_step calls it; called alone, it reduces and averages its own gradients first."""
        if scale is None:
            self.reduce_gradients()
            self.shard_square_norm()
            scale = 1.0 / self.run.world_size
        group = self.param_groups[0]
        mom, lr, wd = group["momentum"], group["lr"], group["weight_decay"]
        gathers = []
        for bank, (full, shard, out) in zip(self.banks, self._buffers()):
            g = shard.to(bank[0].dtype) * scale           # back to the weights' dtype for the momentum
            state = self.state[bank[0]]
            if "momentum" not in state:   # also after a warm-up restored an empty state
                state["momentum"] = torch.zeros_like(g)
            buf = state["momentum"]
            buf.mul_(mom).add_(g)
            g = g.add_(buf, alpha=mom)                                     # Nesterov
            g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)           # MuonEq-R (off trained 0.023 nats worse)
            u = self.ns(g, self.coeffs, dtype=self.dtype) * max(1.0, g.size(-2) / g.size(-1)) ** 0.5
            gathers.append(self.run.start_all_gather(out, u.to(self.dtype)))
        for bank, (_, _, out), work in zip(self.banks, self._buffers(), gathers):
            self.run.wait(work, "all_gather")
            torch._foreach_mul_(bank, 1 - lr * wd)
            torch._foreach_add_(bank, list(out[:len(bank)].to(bank[0].dtype).unbind(0)), alpha=-lr)


def optimizer_step(opts: list[torch.optim.Optimizer], run: Run, clip_norm: float) -> None:
    """One step of every optimizer, without DDP: the matrices' gradients are reduce-scattered by their Muon banks,
    the other parameters' gradients go in one packed all-reduce, the global norm (of the mean gradient, as DDP's
    clip saw it) scales both on the device, and no host sync happens."""
    muons = [o for o in opts if isinstance(o, Muon)]
    adams = [o for o in opts if not isinstance(o, Muon)]
    for m in muons:
        m.reduce_gradients()
    small = [p for o in adams for g in o.param_groups for p in g["params"]]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in small]) \
        if small else torch.zeros(0, device=run.device)
    work = run.start_all_reduce(flat)          # in flight while the reduce-scatters finish
    master = next(p.dtype for o in opts for g in o.param_groups for p in g["params"])   # the weights' dtype
    square = sum((m.shard_square_norm() for m in muons), torch.zeros((), device=run.device, dtype=master))
    scale = torch.full((), 1.0 / run.world_size, device=run.device, dtype=master)
    run.wait(work, "all_reduce")
    if clip_norm > 0:
        square = run.all_reduce(square.view(1)).view(()) + flat.square().sum()
        norm = square.sqrt() / run.world_size
        scale = scale * (clip_norm / (norm + 1e-6)).clamp(max=1.0)   # torch's clip_grad_norm_ rule
    flat.mul_(scale)
    for p, g in zip(small, torch.split(flat, [p.numel() for p in small])):
        p.grad = g.view_as(p)
    for o in adams:
        o.step()
    for m in muons:
        m.step(scale)
    for o in opts:
        o.zero_grad(set_to_none=True)


def build_optimizers(model: GPT, cfg: Config, run: Run) -> list[torch.optim.Optimizer]:
    """One group per label of PARAM_TABLE; asserts every parameter is claimed exactly once."""
    by_label: dict[str, list[nn.Parameter]] = {}
    for p in model.parameters():
        by_label.setdefault(p.label, []).append(p)
    claimed = [id(p) for ps in by_label.values() for p in ps]
    assert len(claimed) == len(set(claimed)) == len(list(model.parameters())), \
        "a parameter is claimed twice or not at all"
    muon_groups, adam_groups = [], []
    for label, params in by_label.items():
        opt, lr_field, wd_field, _ = PARAM_TABLE[label]
        group = dict(params=params, lr=getattr(cfg, lr_field), base_lr=getattr(cfg, lr_field), label=label,
                     weight_decay=getattr(cfg, wd_field) if wd_field else 0.0)
        (muon_groups if opt == "muon" else adam_groups).append(group)
    opts: list[torch.optim.Optimizer] = []
    if adam_groups:
        fused = dict(fused=True) if run.device.type == "cuda" else dict(foreach=True)
        opts.append(torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **fused))
    for group in muon_groups:
        muon = Muon(group.pop("params"), lr=group["lr"], momentum=cfg.muon_momentum, weight_decay=group["weight_decay"],
                    run=run, coeffs=NS_COEFFS[cfg.muon_ns])
        muon.param_groups[0].update(base_lr=group["base_lr"], label=group["label"])
        opts.append(muon)
    return opts


def lr_scale(progress: float, warmdown_frac: float, min_lr: float = 0.0) -> float:
    """1 until the warm-down, then linear to 0 at the end of the expected run, never below the floor min_lr (#1787's
    max(decay, MIN_LR): the decay reaches the floor early and stays there)."""
    if warmdown_frac <= 0 or progress < 1 - warmdown_frac:
        return 1.0
    return max(min_lr, (1 - progress) / warmdown_frac)


# ==================================================================================================
# Data: challenge shards (256 x int32 header, then uint16 tokens)
# ==================================================================================================

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256


def shard_tokens(path: str | Path) -> int:
    """The token count of a shard, after checking magic, version and file size against the header."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_INTS * 4:
        raise RunError(f"{path}: {size} bytes is shorter than the {HEADER_INTS * 4}-byte shard header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise RunError(f"{path}: bad header (magic {header[0]}, version {header[1]}; "
                       f"expected {SHARD_MAGIC}, {SHARD_VERSION})")
    n = int(header[2])
    if size != HEADER_INTS * 4 + 2 * n:
        raise RunError(f"{path}: header says {n} tokens ({HEADER_INTS * 4 + 2 * n} bytes) "
                       f"but the file has {size} bytes")
    return n


def read_shard(path: str | Path, vocab_size: int) -> np.ndarray:
    """Read one shard: header checks, then every id against VOCAB_SIZE."""
    n = shard_tokens(path)
    tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_INTS * 4)
    if n and int(tokens.max()) >= vocab_size:
        raise RunError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}")
    return tokens


def shard_files(data_path: str, split: str) -> list[str]:
    """The shards of a split in name order ("bytes": the CaseOps val byte sidecar, which is not a val shard)."""
    pattern = os.path.join(data_path, f"fineweb_{split}_*.bin")
    sidecar = lambda f: split == "val" and os.path.basename(f).startswith("fineweb_val_bytes_")  # noqa: E731
    files = sorted(f for f in glob.glob(pattern) if not sidecar(f))
    if not files:
        raise RunError(f"DATA_PATH={data_path!r}: no {split} shards match {pattern}")
    return files


def load_val_tokens(cfg: Config) -> torch.Tensor:
    tokens = np.concatenate([read_shard(f, cfg.vocab_size) for f in shard_files(cfg.data_path, "val")])
    return torch.from_numpy((tokens[:cfg.val_tokens] if cfg.val_tokens else tokens).astype(np.int64))


class TokenStream:
    """The train shards in name order as one endless stream; every rank walks the same stream. Every header is
    checked up front; the next shard is read in a background thread, so a 100M-token read never stalls a step."""

    def __init__(self, files: list[str], vocab_size: int) -> None:
        for f in files:
            shard_tokens(f)
        self.files, self.vocab_size = files, vocab_size
        self.index, self.pos = 0, 0
        self.tokens = read_shard(files[0], vocab_size)
        self.reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.next = self.reader.submit(read_shard, files[1 % len(files)], vocab_size)

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos == len(self.tokens):
                self.index = (self.index + 1) % len(self.files)
                self.tokens, self.pos = self.next.result(), 0
                following = self.files[(self.index + 1) % len(self.files)]
                self.next = self.reader.submit(read_shard, following, self.vocab_size)
            k = min(n, len(self.tokens) - self.pos)
            parts.append(self.tokens[self.pos:self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(parts)


class TrainLoader:
    """Each micro-step takes world_size consecutive spans of (local tokens + 1) and keeps span `rank`: disjoint and
    deterministic. The span is cut into sequences of the current training length (SEQ_SCHEDULE's first at the start)."""

    def __init__(self, cfg: Config, run: Run, local_tokens: int) -> None:
        self.stream = TokenStream(shard_files(cfg.data_path, "train"), cfg.vocab_size)
        self.run, self.local_tokens, self.seq_len = run, local_tokens, cfg.seq_stages()[0][1]

    def set_length(self, seq_len: int, batches=()) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cut sequences of seq_len from now on; returns `batches` (read ahead) cut anew: the same tokens."""
        self.seq_len = seq_len
        return [(x.reshape(-1, seq_len), y.reshape(-1, seq_len)) for x, y in batches]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        span = self.local_tokens + 1
        chunk = self.stream.take(span * self.run.world_size)[self.run.rank * span:(self.run.rank + 1) * span]
        t = torch.from_numpy(chunk.astype(np.int64))
        if self.run.device.type == "cuda":
            t = t.pin_memory().to(self.run.device, non_blocking=True)
        return t[:-1].view(-1, self.seq_len), t[1:].view(-1, self.seq_len)

    def next_step(self, grad_accum: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of one optimizer step (copied to the device asynchronously)."""
        return [self.next() for _ in range(grad_accum)]


# ==================================================================================================
# Training: the warm-up, the steps under the wall-clock cap, the switches, then GPTQ calibration inside the cap
# ==================================================================================================

def train_step(model, opts, batches, run: Run, clip_norm: float = 0.0) -> torch.Tensor:
    """One optimizer step over the micro-batches: gradients accumulate locally, then optimizer_step reduces them
    across the ranks (no DDP), clips the global norm at clip_norm (0 = off) on the device and steps."""
    total = torch.zeros((), device=run.device)
    for x, y in batches:
        with run.autocast():
            loss = model(x, y)
        (loss / len(batches)).backward()
        total += loss.detach()
    optimizer_step(opts, run, clip_norm)
    return total / len(batches)


def set_schedule(opts, cfg: Config, step: int, progress: float, seq_changed_at: int | None = None) -> None:
    """LR and Muon momentum of this step; after a SEQ_SCHEDULE length change at step seq_changed_at the LR climbs
    back linearly, 1/SEQ_REWARM_STEPS of the schedule at that step, all of it SEQ_REWARM_STEPS steps on (#2014)."""
    scale = lr_scale(progress, cfg.warmdown_frac, cfg.min_lr)
    if seq_changed_at is not None and cfg.seq_rewarm_steps:
        scale *= min(1.0, (step - seq_changed_at + 1) / cfg.seq_rewarm_steps)
    warm = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    momentum = cfg.muon_momentum_warmup_start + warm * (cfg.muon_momentum - cfg.muon_momentum_warmup_start)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = momentum


class EMA:
    """Exponential moving average of the weights, exported instead of the raw weights. The decay ramps up
    ((1+t)/(10+t)) so that short runs are not dominated by the initialisation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.params = [p for p in model.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        torch._foreach_copy_(self.params, self.shadow)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        by_id = {id(p): s for p, s in zip(self.params, self.shadow)}
        return {name: by_id[id(p)].cpu() for name, p in model.named_parameters()}


def check_ranks_agree(model: nn.Module, run: Run) -> None:
    """Every rank should hold the same weights (same gradients, same schedule); log it, since the export is rank 0's."""
    if not run.distributed:
        return
    total = sum(p.detach().double().sum() for p in model.parameters())
    span = run.all_reduce(torch.stack((total, -total)), dist.ReduceOp.MAX)
    gap = float(span[0] + span[1])
    log("rank_sync: identical weights" if gap == 0 else f"rank_sync: WARNING ranks differ (checksum spread {gap:.3e})")


def training_forward(model: GPT, run: Run, probe: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The forward the training steps call: compiled when COMPILE (fullgraph: a graph break is an error, not a silent
    slowdown); the optimizers reduce the gradients, so there is no DDP wrapper. Where FlashAttention-3 does not trace
    in one graph (seen on the first forward, `probe`), every rank compiles with graph breaks instead, and the log
    says so."""
    fwd = run.compile(model, fullgraph=True)
    if run.compiled and probe is not None and model.blocks[0].attn.backend == "fa3":
        problem = ""
        try:
            with run.autocast():
                fwd(*probe)        # traces the training graph; the loss is dropped, no weight moves
        except torch._dynamo.exc.TorchDynamoException as e:
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        # rank agreement: the fallback changes every rank's graphs, so one rank's failure decides for all
        if run.agree(bool(problem)):
            log(f"attention: FlashAttention-3 breaks the graph on some rank ({problem or 'not this one'}); "
                "compiling with graph breaks (fullgraph=False)")
            torch._dynamo.reset()      # no rank keeps the fullgraph graph it may have traced
            fwd = run.compile(model, fullgraph=False)
    return fwd


def switches(cfg: Config, progress: float) -> tuple[bool, bool]:
    """(recurrence on, late QAT on) at this fraction of the expected run. Every rank computes it from the agreed
    progress, so every rank flips at the same step."""
    recur = not (cfg.recur_layers or cfg.loop_layers) or progress >= cfg.recur_start_frac   # none: one graph
    return recur, cfg.late_qat_frac > 0 and progress >= 1 - cfg.late_qat_frac


def seq_len_at(cfg: Config, progress: float) -> int:
    """SEQ_SCHEDULE's training length at this fraction of the run: from the agreed progress, the same on every rank."""
    return [n for start, n in cfg.seq_stages() if progress >= start][-1]


def warmup_plan(cfg: Config) -> list[tuple[int, tuple[bool, bool]]]:
    """The (training length, switch state) pairs the run passes through, in order: compile_warmup compiles one static
    graph for each (dynamic=False: a new length is a new graph, never a dynamic-shape one)."""
    marks = sorted({0.0, cfg.recur_start_frac, 1 - cfg.late_qat_frac, *(start for start, _ in cfg.seq_stages())})
    return list(dict.fromkeys((seq_len_at(cfg, p), switches(cfg, p)) for p in marks if p < 1))


def plan_label(cfg: Config, seq_len: int, state: tuple[bool, bool]) -> str:
    """A warm-up graph in the log: recur<0|1>_qat<0|1>, after seq<length>_ when SEQ_SCHEDULE is set."""
    return f"seq{seq_len}_" * bool(cfg.seq_schedule.strip()) + f"recur{int(state[0])}_qat{int(state[1])}"


def set_switches(model: GPT, cfg: Config, state: tuple[bool, bool]) -> None:
    model.recur_on = state[0]
    model.set_qat(state[1], QuantSpec.from_config(cfg))


def compile_warmup(model: GPT, opts, cfg: Config, run: Run, grad_accum: int, local_tokens: int):
    """Build the training forward and run WARMUP_STEPS real steps (at least one in each state the run will pass
    through: recurrence off/on, QAT off/on, each SEQ_SCHEDULE length), so that every graph is compiled before the
    clock starts; time the calibration (calibration_reserve); then restore model and optimizers. Returns (the
    training forward, the seconds of the cap kept for the calibration)."""
    loader = TrainLoader(cfg, run, local_tokens)
    if cfg.warmup_steps == 0:
        if run.compiled:
            log("compile_warmup: WARNING WARMUP_STEPS=0: every graph compiles inside the clock")
        return training_forward(model, run), calibration_reserve(model, loader, cfg, run)
    plan = warmup_plan(cfg)
    if run.compiled:   # one graph of the forward per pair: a long SEQ_SCHEDULE passes dynamo's default limit of 8
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(plan))
    n_steps = max(cfg.warmup_steps, len(plan))
    model_state = copy.deepcopy(model.state_dict())
    opt_states = [copy.deepcopy(o.state_dict()) for o in opts]
    with timed("compile_warmup", run):
        batches = loader.next_step(grad_accum)
        set_switches(model, cfg, plan[0][1])   # the probe traces the run's first graph, not one it never uses
        fwd = training_forward(model, run, probe=batches[0])
        for k in range(n_steps):
            seq_len, state = plan[k * len(plan) // n_steps]
            set_switches(model, cfg, state)
            train_step(fwd, opts, loader.set_length(seq_len, batches), run, cfg.grad_clip_norm)
            if k + 1 < n_steps:
                batches = loader.next_step(grad_accum)
    run.barrier()   # every rank's graphs exist: what compiles after this line compiles inside the clock
    log(f"compile_warmup steps:{n_steps} states:{' '.join(plan_label(cfg, n, s) for n, s in plan)}")
    reserve = calibration_reserve(model, loader, cfg, run)
    set_switches(model, cfg, plan[0][1])
    model.train()
    model.load_state_dict(model_state)
    for o, s in zip(opts, opt_states):
        o.load_state_dict(s)
        o.zero_grad(set_to_none=True)
    return fwd, reserve


def calibration_reserve(model: GPT, loader: TrainLoader, cfg: Config, run: Run) -> float:
    """GPTQ_RESERVE_SECONDS, or (0) RESERVE_MARGIN x the calibration's batches per rank x the time of one, measured
    here as calibrate runs it (recurrence on, QAT off, eval mode, all-reduce included; the slowest rank decides).
    The first call pays one-time costs, so the second is timed. The weights do not change."""
    if cfg.gptq_reserve_seconds > 0 or not cfg.max_wallclock_seconds:
        return cfg.gptq_reserve_seconds
    set_switches(model, cfg, (True, False))
    model.eval()
    loader.set_length(cfg.train_seq_len)   # the length calibrate reads
    batch = loader.next()
    for _ in range(2):
        run.sync()
        t = time.perf_counter()
        collect_hessians(model, [batch], run)
        run.sync()
        batch_s = time.perf_counter() - t
    batch_s = run.all_reduce(torch.tensor([batch_s], device=run.device), dist.ReduceOp.MAX).item()
    per_rank = max(1, math.ceil(cfg.gptq_calib_batches / run.world_size))
    reserve = RESERVE_MARGIN * per_rank * batch_s
    need(reserve < cfg.max_wallclock_seconds, f"the calibration's measured reserve {reserve:.1f}s leaves no "
         f"training time of MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds}")
    log(f"gptq_reserve measured_batch:{1000 * batch_s:.0f}ms batches_per_rank:{per_rank} margin:{RESERVE_MARGIN} "
        f"reserve:{1000 * reserve:.0f}ms")
    return reserve


def batch_split(cfg: Config, run: Run) -> tuple[int, int]:
    """(gradient accumulation steps, tokens per micro-batch per rank): the global batch is the same on 1-8 GPUs."""
    grad_accum = REFERENCE_GPUS // run.world_size
    local_tokens = cfg.train_batch_tokens // (run.world_size * grad_accum)
    if local_tokens * run.world_size * grad_accum != cfg.train_batch_tokens or local_tokens % cfg.train_seq_len:
        raise RunError(f"TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} must split into {REFERENCE_GPUS} micro-batches "
                       f"of whole TRAIN_SEQ_LEN={cfg.train_seq_len} sequences")
    odd = [n for _, n in cfg.seq_stages() if local_tokens % n]
    need(not odd, f"SEQ_SCHEDULE={cfg.seq_schedule!r}: lengths {odd} do not divide the micro-batch of {local_tokens} "
         f"tokens (TRAIN_BATCH_TOKENS={cfg.train_batch_tokens} / {REFERENCE_GPUS})")
    return grad_accum, local_tokens


@dataclass
class Calibration:
    """What GPTQ needs from training: the Hessians, and the line that says how they were made."""
    hessians: dict[str, torch.Tensor]
    summary: str


def calibrate(model: GPT, loader: TrainLoader, cfg: Config, run: Run, clock: WallClock) -> Calibration:
    """GPTQ's Hessians, from the next training batches and with the EMA weights (what is exported; `model` holds
    them), inside the training budget: the cap kept a measured reserve for this. Batches stop early rather than
    run past the cap."""
    t0, limit = clock.elapsed(), cfg.max_wallclock_seconds or float("inf")
    wanted = max(1, math.ceil(cfg.gptq_calib_batches / run.world_size))   # micro-batches per rank
    loader.set_length(cfg.train_seq_len)   # SEQ_SCHEDULE's last length, as the exported model ends training
    times: list[float] = []

    def batches():
        for k in range(wanted):
            # the ranks agree on the decision (the slowest rank's pace decides), so no rank is left waiting
            late = float(bool(k) and clock.elapsed() + max(times) > limit)   # one more batch, at the slowest pace
            if run.all_reduce(torch.tensor([late], device=run.device), dist.ReduceOp.MAX).item():
                log(f"gptq_calib: WARNING stopped after {k} of {wanted} batches per rank to stay inside the cap")
                return
            t = time.perf_counter()
            yield loader.next()
            run.sync()
            times.append(time.perf_counter() - t)

    hessians, tokens = collect_hessians(model, batches(), run)
    calib = (f"calib_batches:{len(times) * run.world_size} calib_tokens:{tokens} "
             f"calib_time:{1000 * (clock.elapsed() - t0):.0f}ms")
    log(f"gptq_calib {calib} train_time_with_calib:{1000 * clock.elapsed():.0f}ms")
    if clock.elapsed() > limit:
        log(f"gptq_calib: WARNING training + calibration took {clock.elapsed():.1f}s, over the {limit:.0f}s cap")
    return Calibration(hessians, calib)


def train_phase(cfg: Config, run: Run, tables: ByteTables | None) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                                        Calibration, GPT]:
    """Train under the wall-clock cap (less the calibration reserve), then calibrate GPTQ inside it. Returns the EMA
    weights (CPU, fp32), their labels, GPTQ's calibration and the model holding the EMA weights."""
    grad_accum, local_tokens = batch_split(cfg, run)
    model = build_model(cfg, run)
    labels = param_labels(model)
    log(f"model_params:{sum(p.numel() for p in model.parameters())} attention:{model.blocks[0].attn.backend} "
        f"passes:{len(model.schedule)} grad_accum:{grad_accum} local_batch_tokens:{local_tokens}")
    opts = build_optimizers(model, cfg, run)
    fwd, reserve_s = compile_warmup(model, opts, cfg, run, grad_accum, local_tokens)
    val_tokens = load_val_tokens(cfg) if cfg.val_loss_every else None
    loader, ema = TrainLoader(cfg, run, local_tokens), EMA(model, cfg.ema_decay)
    host_flags = torch.zeros(2, pin_memory=run.device.type == "cuda")   # (cap hit, elapsed s): sent without a sync
    run.barrier()
    run.sync()
    train_s = cfg.max_wallclock_seconds - reserve_s if cfg.max_wallclock_seconds else 0.0
    clock, step, step_avg_s, agreed_s = WallClock(train_s), 0, 0.0, 0.0
    state, seq_len, seq_changed_at = switches(cfg, 0.0), loader.seq_len, None
    set_switches(model, cfg, state)
    recent = collections.deque(maxlen=20)   # the last step times: the cap check plans with the slowest
    batches = loader.next_step(grad_accum)
    while step < cfg.iterations:
        progress = clock.progress(step, cfg.iterations, agreed_s)
        if switches(cfg, progress) != state:   # the graph of the new state was compiled in the warm-up
            old, state = state, switches(cfg, progress)
            set_switches(model, cfg, state)
            for name, was, now in (("recurrence", old[0], state[0]), ("late_qat", old[1], state[1])):
                if now != was:
                    log(f"{name}:{'on' if now else 'off'} step:{step} train_time:{1000 * clock.elapsed():.0f}ms")
        if seq_len_at(cfg, progress) != seq_len:   # so was each length's
            seq_len, seq_changed_at = seq_len_at(cfg, progress), step
            batches = loader.set_length(seq_len, batches)
            log(f"seq_len:{seq_len} step:{step} train_time:{1000 * clock.elapsed():.0f}ms")
        set_schedule(opts, cfg, step, progress, seq_changed_at)
        elapsed_before = clock.elapsed()
        loss = train_step(fwd, opts, batches, run, cfg.grad_clip_norm)
        ema.update()
        batches = loader.next_step(grad_accum)   # the next step's batches, read while the device works on this one
        # Will one more step fit? Assume this step and the next each take as long as the slowest recent one, plus a
        # little slack for one-off hiccups. One all-reduce, where the step waits for the device anyway, makes every
        # rank agree on that, on a non-finite loss, and on the elapsed time that drives the schedule.
        slowest = max(recent, default=0.0)
        cap_hit = train_s > 0 and elapsed_before + 2 * slowest + CAP_SLACK_S > train_s
        host_flags[0], host_flags[1] = float(cap_hit), elapsed_before
        flags = torch.cat((loss.float().view(1), (~torch.isfinite(loss)).float().view(1),
                           host_flags.to(run.device, non_blocking=True)))
        loss_sum, bad, cap, elapsed_sum = run.all_reduce(flags).tolist()
        agreed_s = elapsed_sum / run.world_size
        step += 1
        recent.append(clock.elapsed() - elapsed_before)
        step_avg_s = clock.elapsed() / step
        if bad:
            raise RunError(f"non-finite training loss at step {step}; nothing was exported")
        if step % cfg.train_log_every == 0 or step == cfg.iterations or cap:
            log(f"step:{step}/{cfg.iterations} train_loss:{loss_sum / run.world_size:.4f} "
                f"train_time:{1000 * clock.elapsed():.0f}ms step_avg:{1000 * step_avg_s:.2f}ms")
        if cfg.val_loss_every and step % cfg.val_loss_every == 0:
            with clock.paused():
                model.eval()
                r = evaluate(model, val_tokens, tables, run,
                             Geometry(cfg.train_seq_len, cfg.train_seq_len, cfg.eval_batch_windows))
                model.train()
            log(f"step:{step}/{cfg.iterations} val_loss:{r.loss:.4f} val_bpb:{r.bpb:.4f} "
                f"train_time:{1000 * clock.elapsed():.0f}ms")
        if cap:
            log(f"stopping_early: wallclock_cap train_time:{1000 * clock.elapsed():.0f}ms step:{step}/{cfg.iterations}")
            break
    log(f"train_done steps:{step} train_time:{1000 * clock.elapsed():.0f}ms step_avg:{1000 * step_avg_s:.2f}ms")
    if not state[0]:
        log(f"recurrence: WARNING the run ended before RECUR_START_FRAC={cfg.recur_start_frac}: the exported model "
            "runs second passes that never trained")
    check_ranks_agree(model, run)
    if run.device.type == "cuda":
        log(f"peak_memory_allocated:{torch.cuda.max_memory_allocated() // 2**20}MiB")
    ema.copy_to_model()     # on the device: from here on the model holds what is exported, recurrence on, QAT off
    set_switches(model, cfg, (True, False))
    model.eval()
    clock.limit_s = cfg.max_wallclock_seconds
    calib = calibrate(model, loader, cfg, run, clock)
    return ema.state_dict(model), labels, calib, model     # to the CPU only now, outside the clock


# ==================================================================================================
# Export: GPTQ, the artifact format, compression, the size limit
# ==================================================================================================

ARTIFACT_MAGIC = b"PGOLF-3\n"   # 3: header notes (AWQ-lite group, LQER, PACK_GROUPS layout); 2: LN_SCALE stored
READ_MAGICS = (ARTIFACT_MAGIC, b"PGOLF-2\n")   # version 2 is version 3 without notes: it still loads
CLIP_FRACTIONS = (1.0, 0.995, 0.99, 0.98, 0.97, 0.96, 0.94, 0.92, 0.9, 0.87, 0.84, 0.8)
FP16_TINY = float(torch.finfo(torch.float16).tiny)   # the smallest normal fp16: the floor of a stored scale


def row_scales(w: torch.Tensor, qmax: int, clip_k: float) -> torch.Tensor:
    """Per-row scale (as stored: fp16-rounded) of the grid scale x {-qmax..qmax}. clip_k > 0: the row clips at
    clip_k x its std (SDClip, PR #1394; a larger k means a coarser grid, fewer levels used, a smaller artifact).
    clip_k = 0: the fraction of the row's abs-max with the least squared rounding error, of 12 candidates."""
    w = w.float()
    if clip_k > 0:
        return (clip_k * w.std(dim=1, correction=0) / qmax).half().float().clamp_min(FP16_TINY)
    amax = w.abs().amax(dim=1)
    best_err, best = torch.full_like(amax, float("inf")), (amax / qmax).half().float().clamp_min(FP16_TINY)
    for frac in CLIP_FRACTIONS:
        scale = (amax * frac / qmax).half().float().clamp_min(FP16_TINY)
        err = ((torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax) * scale[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, scale, best)
    return best


def gptq(w: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, qmax: int | torch.Tensor, damp: float,
         block: int = 128) -> torch.Tensor:
    """Integer codes of w [rows, cols] on the grid scale x {-qmax..qmax} that keep the layer's output X w^T close,
    for inputs with H = X^T X (GPTQ, Frantar et al. 2022): columns in order of descending H diagonal, each rounded in
    turn and its error spread onto the columns not yet rounded through the Cholesky factor of H^-1, in blocks of
    `block` columns. Columns whose input is always 0 are set to 0. scale is [rows] (one grid per row) or [rows, cols]
    and qmax an int or [cols] (AWQ-lite's finer group, #1908)."""
    dt = torch.float64 if w.dtype == torch.float64 else torch.float32
    W, H = w.to(dt).clone(), H.to(dt).clone()
    S = (scale if scale.dim() == 2 else scale[:, None].expand_as(W)).to(dt)
    lim = torch.as_tensor(qmax, dtype=dt, device=W.device).expand(W.size(1))
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(H.diagonal(), descending=True)
    W, H, S, lim = W[:, perm], H[perm][:, perm], S[:, perm], lim[perm]
    for attempt in range(4):   # a rank-deficient H needs more damping than the default
        try:
            Hd = H + (damp * 10 ** attempt) * H.diagonal().mean() * torch.eye(len(H), dtype=dt, device=H.device)
            U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Hd)), upper=True)
            break
        except torch.linalg.LinAlgError:
            if attempt == 3:
                raise
    Q = torch.zeros_like(W)
    for i1 in range(0, W.size(1), block):
        i2 = min(i1 + block, W.size(1))
        W1, E, U1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s, m = S[:, i1 + i], lim[i1 + i]
            q = torch.clamp(torch.round(W1[:, i] / s), -m, m)
            Q[:, i1 + i] = q
            E[:, i] = (W1[:, i] - q * s) / U1[i, i]
            W1[:, i:] -= E[:, i:i + 1] * U1[i:i + 1, i:]
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)].to(torch.int8)


@dataclass(frozen=True)
class QuantSpec:
    """How the export rounds each tensor whose label stores it as int6 or int8 (see Config, export section)."""
    int6_clip_k: float = Config.int6_clip_k
    embed_clip_k: float = Config.embed_clip_k
    gptq_damp: float = Config.gptq_damp
    embed_bits: int = Config.embed_bits
    mlp_clip_k: float = Config.mlp_clip_k
    lqer_rank: int = Config.lqer_rank
    lqer_top: int = Config.lqer_top
    lqer_group: int = Config.lqer_group
    awq_group: int = Config.awq_group
    pack_groups: bool = Config.pack_groups

    @classmethod
    def from_config(cls, cfg: "Config") -> "QuantSpec":
        return settings_view(cls, cfg, "")


GATE_PARAM = ".attn.gate"   # ATTN_GATE's W: int8 per row on its own grid, whatever EMBED_* say (#1736, #1855)


def code_max(kind: str, spec: QuantSpec, name: str = "") -> int:
    """The largest code: int6 matrices 31, the attention gates 127, the embedding tables 2^(EMBED_BITS - 1) - 1."""
    if kind == "int6":
        return INT6_MAX
    return INT8_MAX if name.endswith(GATE_PARAM) else 2 ** (spec.embed_bits - 1) - 1


def clip_rule(name: str, kind: str, spec: QuantSpec) -> float:
    """The clip k of one matrix: the gates' search (0), the embedding tables', the MLP's (MLP_CLIP_K, when set:
    #1855), or INT6_CLIP_K."""
    if kind != "int6":
        return 0.0 if name.endswith(GATE_PARAM) else spec.embed_clip_k
    return spec.mlp_clip_k if spec.mlp_clip_k > 0 and ".mlp." in name else spec.int6_clip_k


def fine_scale(scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """AWQ-lite's grid (#1908): the same clip range as the row's, on 127 levels a side (the record's int8 group)."""
    return (scale.float() * qmax / INT8_MAX).half().float().clamp_min(FP16_TINY)


def quantize_tensor(w: torch.Tensor, kind: str, spec: QuantSpec, H: torch.Tensor | None = None,
                    widen: float = 1.0, name: str = "",
                    fine: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp16 row scales) of one int6 or int8 (embedding) matrix `name`: the clip rule sets the grid, then
    GPTQ (PR #1019) when a Hessian is given, else round to nearest (the quant study's reference). widen > 1 multiplies
    the int6 scales: log2(widen) fewer bits per weight after entropy coding (the size knob of fit_to_limit). The
    columns fine = (first, end) use fine_scale(scale) and codes up to 127 (AWQ-lite, #1908)."""
    qmax = code_max(kind, spec, name)
    scale = row_scales(w, qmax, clip_rule(name, kind, spec))
    if kind == "int6" and widen != 1.0:
        scale = (scale * widen).half().float()
    grid, limit = scale, torch.full((w.size(1),), float(qmax), device=w.device)
    if fine is not None:
        grid = scale[:, None].repeat(1, w.size(1))
        grid[:, fine[0]:fine[1]] = fine_scale(scale, qmax)[:, None]
        limit[fine[0]:fine[1]] = INT8_MAX
    if H is not None:
        q = gptq(w, H.to(w.device), grid, limit, spec.gptq_damp)
    else:
        grid = grid if grid.dim() == 2 else grid[:, None]
        q = torch.clamp(torch.round(w.float() / grid), -limit, limit).to(torch.int8)
    return q, scale.half()


def awq_choice(state: dict[str, torch.Tensor], labels: dict[str, str], hessians: dict[str, torch.Tensor],
               spec: QuantSpec) -> tuple[str, int] | None:
    """AWQ-lite (#1908): (matrix, first column) of the one group of AWQ_GROUP inputs, over the matrices with a Hessian
    stored below 8 bits, with the largest sum of activation RMS x mean |w|. The RMS is sqrt(diag H) (the record's
    per-tensor token count only rescales it; a recurrent layer's two passes both count)."""
    g, best = spec.awq_group, None
    for name, t in state.items():
        kind = PARAM_TABLE[labels[name]][3]
        if g == 0 or name not in hessians or t.dim() != 2 or kind not in ("int6", "int8") \
                or code_max(kind, spec, name) >= INT8_MAX or t.size(1) < g:
            continue
        n = t.size(1) // g
        rms = hessians[name].diagonal().float().clamp_min(0).sqrt().to(t.device)
        score = (rms * t.float().abs().mean(dim=0))[:n * g].view(n, g).sum(dim=1)
        i = int(score.argmax())
        if best is None or float(score[i]) > best[0]:
            best = (float(score[i]), name, i * g)
    return None if best is None else (best[1], best[2])


def grouped(x: torch.Tensor, group: int) -> torch.Tensor:
    """x's values flattened into rows of `group`, the last padded with 0 (LQER's B: one scale per row)."""
    return F.pad(x.flatten(), (0, -x.numel() % group)).view(-1, group)


def ungrouped(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return flat.flatten()[:like.numel()].view_as(like)


def lqer_factors(err: torch.Tensor, rank: int, group: int) -> dict[str, np.ndarray]:
    """LQER (#1797, as #1855 ships it): err ~ A B from its rank-r SVD, A = U S [rows, r] as int2 codes {-2..1} on one
    scale max|A| / 1.5, B = V^T [r, cols] as int4 codes {-8..7}, one scale (max / 7.5) per `group` values of B flat."""
    U, S, Vh = torch.linalg.svd(err.float(), full_matrices=False)
    r = min(rank, S.numel())
    a, b = U[:, :r] * S[:r], Vh[:r]
    sa = (a.abs().amax().clamp_min(FP16_TINY) / 1.5).half()
    flat = grouped(b, group)
    sb = (flat.abs().amax(dim=1).clamp_min(FP16_TINY) / 7.5).half()
    qb = ungrouped(torch.clamp(torch.round(flat / sb.float()[:, None]), -8, 7), b)
    return dict(lqer_a=torch.clamp(torch.round(a / sa.float()), -2, 1).to(torch.int8).numpy(),
                lqer_a_scale=sa.reshape(1).numpy(), lqer_b=qb.to(torch.int8).numpy(), lqer_b_scale=sb.numpy())


def dequantize(p: dict[str, np.ndarray], note: dict) -> torch.Tensor:
    """One quantized matrix back in float32: codes x row scales, the AWQ-lite group on its finer scale, plus LQER's
    A B. The codes as stored: transposed and row-sorted (the inverse of "perm") when PACK_GROUPS laid them out."""
    codes = p["q"].T if note.get("transposed") else p["q"]
    codes = codes[np.argsort(p["perm"])] if "perm" in p else codes
    q = torch.from_numpy(np.ascontiguousarray(codes)).float()
    w = q * torch.from_numpy(p["scale"]).float()[:, None]
    if "fine" in note:
        a, b = note["fine"]
        w[:, a:b] = q[:, a:b] * torch.from_numpy(p["fine_scale"]).float()[:, None]
    if "lqer_a" in p:
        qb = torch.from_numpy(p["lqer_b"]).float()
        b = ungrouped(grouped(qb, note["lqer_group"]) * torch.from_numpy(p["lqer_b_scale"]).float()[:, None], qb)
        w += (torch.from_numpy(p["lqer_a"]).float() * float(p["lqer_a_scale"][0])) @ b
    return w


@contextlib.contextmanager
def exact_fp32(device_type: str):
    """Matmuls in full float32: no autocast, and no TF32 (which rounds float32 inputs to 10 bits of mantissa)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


@torch.no_grad()
def collect_hessians(model: GPT, batches, run: Run) -> tuple[dict[str, torch.Tensor], int]:
    """H = X^T X of the inputs of every QLinear (both passes of a recurrent layer add to one H) and, for the tied
    embedding quantized as the output head, of the final-norm output; summed over `batches` on every rank and
    all-reduced, in float32 whatever the autocast. Layers that read the same input (q, k, v) share one H. Returns
    ({weight name: H}, tokens seen)."""
    sums: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    last = [None, None]          # (the last input seen, its Hessian's name): q, k and v are called on one tensor

    def hook(name):
        def add(module, inputs):
            x = inputs[0]
            if x is last[0]:
                alias.setdefault(name, last[1])
                if alias[name] == last[1]:
                    return
            x = x.detach().reshape(-1, x.size(-1)).float()
            with exact_fp32(x.device.type):   # the hooks run under autocast
                sums[name] = sums.get(name, 0) + x.T @ x
            last[0], last[1] = inputs[0], name
        return add

    handles = [m.register_forward_pre_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, QLinear)]
    tokens = 0
    try:
        for x, _ in batches:
            with run.autocast():
                h = model.hidden(x)
            hn = rms_norm(h.float()).reshape(-1, h.size(-1))
            with exact_fp32(hn.device.type):
                sums["tok_emb.weight"] = sums.get("tok_emb.weight", 0) + hn.T @ hn
            tokens += x.numel()
    finally:
        for handle in handles:
            handle.remove()
    names = sorted(sums)
    flat = run.all_reduce(torch.cat([sums[n].flatten() for n in names])) if names else None
    out, offset = {}, 0
    for n in names:
        out[n] = flat[offset:offset + sums[n].numel()].view_as(sums[n]).cpu()
        offset += sums[n].numel()
    for n, target in alias.items():
        out[n] = out[target]
    tokens = int(run.all_reduce(torch.tensor([tokens], device=run.device)).item())
    return out, tokens


def shuffle_bytes(a: np.ndarray) -> bytes:
    """Byte-plane shuffle (all first bytes, then all second bytes ...): fp16 scales and values compress better."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1, a.itemsize).T.tobytes()


def unshuffle_bytes(b: bytes, dtype: str, shape: list[int]) -> np.ndarray:
    dt = np.dtype(dtype)
    n = int(np.prod(shape))
    return np.frombuffer(b, np.uint8).reshape(dt.itemsize, n).T.copy().view(dt).reshape(shape)


PACK_SORTED = ("tok_emb.weight", "attn.c_q.weight", "mlp.fc.weight")   # the rows #1855 sorts (PACK_GROUPS)


def nn_order(codes: np.ndarray) -> np.ndarray:
    """Rows in L1 nearest-neighbour order from row 0 (#1855): once transposed, similar rows sit side by side."""
    x = codes.astype(np.int16)
    left = np.ones(len(x), dtype=bool)
    order = [0]
    left[0] = False
    for _ in range(len(x) - 1):
        rest = np.flatnonzero(left)
        order.append(int(rest[np.abs(x[rest] - x[order[-1]]).sum(axis=1).argmin()]))
        left[order[-1]] = False
    return np.array(order, dtype=np.uint16 if len(x) <= 65536 else np.uint32)


def lay_out(parts: dict[str, dict[str, np.ndarray]], header: dict, pack_groups: bool,
            perms: dict[str, np.ndarray] | None = None) -> bytes:
    """One plain payload: header length, JSON header, the byte-shuffled arrays. PACK_GROUPS (#1855): the codes first,
    each role's matrices together in layer order, transposed, PACK_SORTED rows in nn_order (its "perm" stored).
    `perms`: row orders already computed (any order reads back, since it is stored); new ones are added to it."""
    items, perms = [], {} if perms is None else perms
    for name, p in parts.items():
        if pack_groups and "q" in p:
            if name.endswith(PACK_SORTED):
                if name not in perms:   # the sort is quadratic in rows (~20 s for 8192 x 512): once per export
                    perms[name] = nn_order(p["q"])
                p["perm"] = perms[name]
                p["q"] = p["q"][p["perm"]]
            p["q"] = np.ascontiguousarray(p["q"].T)
            header["notes"].setdefault(name, {})["transposed"] = True
        m = re.fullmatch(r"blocks\.(\d+)\.(.*)", name)
        group = (0, m.group(2), int(m.group(1))) if m else (0, name, 0)   # role, then layer
        for role, arr in p.items():
            items.append((group if pack_groups and role == "q" else (1, len(items)), name, role, arr))
    entries, chunks, offset = [], [], 0
    for _, name, role, arr in sorted(items, key=lambda item: item[0]):
        data = shuffle_bytes(arr)
        entries.append(dict(name=name, role=role, dtype=arr.dtype.str, shape=list(arr.shape), offset=offset,
                            nbytes=len(data)))
        chunks.append(data)
        offset += len(data)
    text = json.dumps(dict(header, tensors=entries)).encode()
    return len(text).to_bytes(4, "little") + text + b"".join(chunks)


def pack_state(state: dict[str, torch.Tensor], labels: dict[str, str], model_cfg: dict, spec: QuantSpec = QuantSpec(),
               hessians: dict[str, torch.Tensor] | None = None, widen: float = 1.0,
               perms: dict[str, np.ndarray] | None = None) -> bytes:
    """Quantize each tensor by its label's storage (AWQ-lite's group in one matrix), add LQER's factors to the
    LQER_TOP matrices of the largest ||W - Q||, and lay out the payload (see lay_out; `perms` as there)."""
    hessians = hessians or {}
    fine = awq_choice(state, labels, hessians, spec)
    parts: dict[str, dict[str, np.ndarray]] = {}
    storage, notes = {}, {}
    for name, t in state.items():
        kind = PARAM_TABLE[labels[name]][3]
        if kind in ("int6", "int8") and t.dim() == 2:
            cols = (fine[1], fine[1] + spec.awq_group) if fine and fine[0] == name else None
            q, scale = quantize_tensor(t, kind, spec, hessians.get(name), widen, name, cols)
            parts[name] = dict(q=q.cpu().numpy(), scale=scale.cpu().numpy())
            if cols:
                parts[name]["fine_scale"] = fine_scale(scale, code_max(kind, spec, name)).half().cpu().numpy()
                notes[name] = dict(fine=list(cols))
        else:
            kind = "fp32" if kind == "fp32" else "fp16"
            parts[name] = dict(value=t.detach().cpu().to(torch.float32 if kind == "fp32" else torch.float16).numpy())
        storage[name] = kind
    if spec.lqer_rank > 0:
        err = {n: state[n].detach().float().cpu() - dequantize(p, notes.get(n, {})) for n, p in parts.items()
               if "q" in p}
        for name in sorted(err, key=lambda n: -float(err[n].norm()))[:spec.lqer_top]:
            parts[name].update(lqer_factors(err[name], spec.lqer_rank, spec.lqer_group))
            notes.setdefault(name, {})["lqer_group"] = spec.lqer_group
    return lay_out(parts, dict(model=model_cfg, storage=storage, notes=notes), spec.pack_groups, perms)


def unpack_state(payload: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    n = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4:4 + n])
    blob = payload[4 + n:]
    parts: dict[str, dict[str, np.ndarray]] = {}
    for e in header["tensors"]:
        data = blob[e["offset"]:e["offset"] + e["nbytes"]]
        parts.setdefault(e["name"], {})[e["role"]] = unshuffle_bytes(data, e["dtype"], e["shape"])
    model_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in header["model"].items()}   # JSON has no tuples
    model_cfg = {**MODEL_FIELDS_BEFORE, **model_cfg}
    notes = header.get("notes", {})   # version 2 has none
    state = {name: dequantize(p, notes.get(name, {})) if "q" in p else torch.from_numpy(p["value"]).float()
             for name, p in parts.items()}
    return model_cfg, state


def _brotli(data: bytes) -> bytes:
    import brotli
    return brotli.compress(data, quality=11, lgwin=24)


def _zstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdCompressor(level=22).compress(data)


def _unbrotli(data: bytes) -> bytes:
    import brotli
    return brotli.decompress(data)


def _unzstd(data: bytes) -> bytes:
    import zstandard
    return zstandard.ZstdDecompressor().decompress(data)


# name: (id byte, compress, decompress); pack_artifact keeps whichever is smallest
COMPRESSORS = {
    "lzma": (1, lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME), lzma.decompress),
    "brotli": (2, _brotli, _unbrotli),
    "zstd": (3, _zstd, _unzstd),
}
CODEC_PACKAGES = {2: ("brotli", "brotli"), 3: ("zstd", "zstandard")}   # id: (compressor, Python package)


def check_codec(ident: int) -> None:
    """A missing compressor package is one clear error, before training rather than after it."""
    if ident in CODEC_PACKAGES:
        name, package = CODEC_PACKAGES[ident]
        try:
            importlib.import_module(package)
        except ImportError:
            raise RunError(f"the {name} compressor needs the Python package {package}: "
                           "pip install -r requirements.txt") from None


def pack_artifact(payload: bytes) -> tuple[bytes, str, dict[str, int]]:
    """Every compressor at once (threads: the codecs release the GIL), keep the smallest."""
    with concurrent.futures.ThreadPoolExecutor(len(COMPRESSORS)) as pool:
        packed = pool.map(lambda c: ARTIFACT_MAGIC + bytes([c[0]]) + c[1](payload), COMPRESSORS.values())
        blobs = dict(zip(COMPRESSORS, packed))
    name = min(blobs, key=lambda k: len(blobs[k]))
    return blobs[name], name, {k: len(b) for k, b in blobs.items()}


def fit_to_limit(state, labels, model_cfg, budget: int, spec: QuantSpec = QuantSpec(), hessians=None,
                 max_widen: float = 4.0):
    """Pack; while the artifact is over `budget` bytes, widen every int6 grid by the factor that removes the excess
    (log2(widen) bits per int6 weight) plus 1%, and quantize (GPTQ included) and pack again. Returns (blob,
    compressor, sizes, widen)."""
    n_int6 = sum(t.numel() for n, t in state.items() if PARAM_TABLE[labels[n]][3] == "int6" and t.dim() == 2)
    widen, perms = 1.0, {}     # PACK_GROUPS' row orders: sorted on the first pass, reused on the wider ones
    while True:
        blob, name, sizes = pack_artifact(pack_state(state, labels, model_cfg, spec, hessians, widen, perms))
        log(f"export_pack widen:{widen:.4f} " + " ".join(f"{k}_bytes:{v}" for k, v in sizes.items()))
        if len(blob) <= budget or widen >= max_widen or n_int6 == 0:
            return blob, name, sizes, widen
        widen = min(max_widen, widen * 2 ** (8 * (len(blob) - budget) / n_int6) * 1.01)


def read_artifact(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read an artifact written by pack_artifact: no pickle, nothing executed."""
    if not path.is_file():
        raise RunError(f"ARTIFACT_PATH={str(path)!r}: file not found")
    data = path.read_bytes()
    magic = next((m for m in READ_MAGICS if data.startswith(m)), b"")
    if data.startswith(b"PGOLF-") and not magic:
        raise RunError(f"{path}: artifact format {data[:8].strip()!r} is not one this script reads "
                       f"({', '.join(repr(m.strip()) for m in READ_MAGICS)}); export it again")
    if not magic or len(data) <= len(magic):
        raise RunError(f"{path}: not an artifact of this script (bad magic)")
    by_id = {ident: decompress for ident, _, decompress in COMPRESSORS.values()}
    ident = data[len(magic)]
    if ident not in by_id:
        raise RunError(f"{path}: unknown compressor id {ident}")
    check_codec(ident)
    try:
        return unpack_state(by_id[ident](data[len(magic) + 1:]))
    except Exception as e:
        raise RunError(f"{path}: corrupt artifact ({type(e).__name__}: {e})") from None


# The code as a records folder ships it (tools/package_record.py writes it with these functions): the readable source,
# lzma-compressed and base85-encoded in a two-line wrapper that runs it unchanged. The artifact budget counts it.
WRAP_HEAD = "# train_gpt.py, compressed by tools/package_record.py (lzma + base85); the readable source is in the "
WRAP_LINE = 'import base64,lzma\nexec(compile(lzma.decompress(base64.b85decode("{}")),"train_gpt.py","exec"))\n'


def wrap_source(source: str) -> str:
    """A train_gpt.py that runs `source` unchanged: decompressed and exec'd in its own module namespace, so __name__,
    __file__ (the wrapper: code_bytes counts what ran) and the log's source block (the wrapper too) behave alike."""
    payload = base64.b85encode(lzma.compress(source.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return WRAP_HEAD + "project's repository\n" + WRAP_LINE.format(payload)


def unwrap_source(text: str) -> str | None:
    """The readable source inside a wrapper made by wrap_source, or None when `text` is not one."""
    m = re.fullmatch(re.escape(WRAP_HEAD) + r".*\n" + re.escape(WRAP_LINE).replace(r"\{\}", "([!-~]*)"), text,
                     flags=re.S)
    return lzma.decompress(base64.b85decode(m.group(1))).decode("utf-8") if m else None


def shipped_code_bytes(source: str) -> int:
    """The bytes of train_gpt.py in a records folder: `source` itself when it is a wrapper, else its wrapper."""
    return len((source if unwrap_source(source) is not None else wrap_source(source)).encode("utf-8"))


def export_phase(cfg: Config, run: Run, state: dict[str, torch.Tensor], labels: dict[str, str], path: Path,
                 calib: Calibration | None = None) -> None:
    """Quantize (GPTQ where there are Hessians), pack and write the artifact on rank 0, atomically; every rank gets
    its outcome, and an over-size artifact is never called a success."""
    source = Path(__file__).read_text(encoding="utf-8")
    code_bytes = shipped_code_bytes(source)   # what a records folder ships, not the readable source
    spec = QuantSpec.from_config(cfg)

    def export() -> int:
        with timed("export", run):
            model_cfg = {f: getattr(cfg, f) for f in MODEL_FIELDS}
            blob, name, sizes, widen = fit_to_limit(state, labels, model_cfg, ARTIFACT_LIMIT_BYTES - code_bytes, spec,
                                                    calib.hessians if calib else None)
            write_atomic(path, blob, replace=False)
        log(f"artifact:{path} quantizer:{'gptq' if calib else 'rtn'} {calib.summary + ' ' if calib else ''}"
            + " ".join(f"{k}:{v}" for k, v in dataclasses.asdict(spec).items()) + f" int6_scale_widen:{widen:.4f} "
            + " ".join(f"{k}_bytes:{v}" for k, v in sizes.items()))
        log(f"code_bytes:{code_bytes} model_bytes:{len(blob)} total_submission_bytes:{code_bytes + len(blob)} "
            f"compressor:{name} source_bytes:{len(source.encode())}")
        return len(blob)

    total = code_bytes + run.main_only(export)
    if total > ARTIFACT_LIMIT_BYTES:
        raise RunError(f"total submission {total} bytes exceeds the {ARTIFACT_LIMIT_BYTES}-byte limit "
                       f"(artifact kept at {path})")


# ==================================================================================================
# Evaluation: exact bytes, the single-pass sliding window, causal SLOT, score-first TTT, one budget
# ==================================================================================================

@dataclass
class ByteTables:
    """UTF-8 bytes of each target: base[t] + (space[t] and not boundary[prev]) (RULES.md, as the baseline counts)."""
    base: torch.Tensor       # int64 [V]: bytes of the piece without its leading "▁" (any other "▁" is one space);
                             # byte-fallback pieces count 1
    space: torch.Tensor      # bool [V]: the piece starts with "▁"
    boundary: torch.Tensor   # bool [V]: control / unknown / unused (BOS): counts 0 and swallows the next space
    sidecar: torch.Tensor | None = None   # int32 [val tokens]: each token's original UTF-8 bytes (CaseOps); when
                                          # set it alone counts, by stream position

    def count(self, prev: torch.Tensor, target: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Bytes of the targets at stream indices `positions` (prev: the tokens before them)."""
        if self.sidecar is not None:
            assert positions is not None, "the sidecar counts by stream position"
            return self.sidecar[positions].long()
        return self.base[target] + (self.space[target] & ~self.boundary[prev]).long()

    def slice(self, a: int, b: int) -> "ByteTables":
        """The rule for the val tokens a..b-1 scored as a stream of their own (a study's val slice)."""
        return self if self.sidecar is None else dataclasses.replace(self, sidecar=self.sidecar[a:b])

    def to(self, device) -> "ByteTables":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: None if t is None else t.to(device) for k, t in moved.items()})


def load_byte_tables(path: str, vocab_size: int) -> ByteTables:
    import sentencepiece as spm
    if not os.path.isfile(path):
        raise RunError(f"TOKENIZER_PATH={path!r}: file not found")
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.vocab_size() != vocab_size:
        raise RunError(f"TOKENIZER_PATH={path!r} has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}")
    check_countable(sp, path)
    base = torch.zeros(vocab_size, dtype=torch.int64)
    space = torch.zeros(vocab_size, dtype=torch.bool)
    boundary = torch.zeros(vocab_size, dtype=torch.bool)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            boundary[i] = True
        elif sp.is_byte(i):
            base[i] = 1
        else:
            piece = sp.id_to_piece(i)
            space[i] = piece.startswith("\u2581")
            # a "▁" elsewhere (whitespace-only pieces "▁▁", suffix pieces "the▁") is one space byte, not three
            base[i] = len(piece.removeprefix("\u2581").replace("\u2581", " ").encode("utf-8"))
    return ByteTables(base, space, boundary)


def eval_byte_tables(cfg: Config) -> ByteTables:
    """The byte rule of the run's tokenizer; with a CaseOps tokenizer (its pieces hold the case operators) the bytes
    come from the val byte sidecar, never from the pieces: an operator is 0 bytes of the original text, and a
    capital letter is written lowercase in the piece."""
    import sentencepiece as spm
    tables = load_byte_tables(cfg.tokenizer_path, cfg.vocab_size)
    sp = spm.SentencePieceProcessor(model_file=cfg.tokenizer_path)
    if not any(sp.piece_to_id(op) != sp.unk_id() for op in CASEOPS_OPERATORS):
        return tables
    files = shard_files(cfg.data_path, "val")
    sidecars = sorted(glob.glob(os.path.join(cfg.data_path, "fineweb_val_bytes_*.bin")))
    need(bool(sidecars), f"TOKENIZER_PATH={cfg.tokenizer_path!r} is a CaseOps tokenizer: its bytes come from the val "
         f"byte sidecar fineweb_val_bytes_*.bin, and DATA_PATH={cfg.data_path!r} has none (data/download.py --variant "
         "sp8192_caseops fetches it)")
    n_val = sum(shard_tokens(f) for f in files)
    side = np.concatenate([read_shard(f, 65536) for f in sidecars])
    need(len(side) == n_val, f"{sidecars[0]}: the val byte sidecar has {len(side)} entries but the val stream "
         f"{files[0]}{' ...' if len(files) > 1 else ''} has {n_val} tokens")
    return dataclasses.replace(tables, sidecar=torch.from_numpy(side.astype(np.int32)))


def check_countable(sp, path: str) -> None:
    """Refuse the tokenizers whose text the per-token rule cannot count exactly (the records' sp1024 and sp8192 pass:
    a standalone "▁" piece, no dummy prefix, leading whitespace removed)."""
    i = sp.piece_to_id("\u2581")
    if sp.id_to_piece(i) != "\u2581" or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i):
        raise RunError(f"TOKENIZER_PATH={path!r} has no standalone '\u2581' piece: a space it cannot merge falls "
                       "back to "
                       "the byte pieces <0xE2><0x96><0x81>, counted 3 bytes for 1 (openai/parameter-golf issue #897)")
    if not hasattr(sp, "normalize"):    # sentencepiece < 0.2.0 cannot say how it normalizes; the records' models pass
        return
    plain, spaced = sp.normalize("a"), sp.normalize(" a")
    if plain.endswith("\u2581"):
        raise RunError(f"TOKENIZER_PATH={path!r} adds a dummy whitespace suffix (treat_whitespace_as_suffix): "
                       "every document would count one byte it does not have")
    if spaced != plain and not plain.startswith("\u2581"):
        raise RunError(f"TOKENIZER_PATH={path!r} keeps a document's leading whitespace without a dummy prefix "
                       "(remove_extra_whitespaces and add_dummy_prefix off): the rule drops that space after BOS")


def build_windows(n_tokens: int, seq_len: int, stride: int) -> np.ndarray:
    """Windows [start, end, first_scored] over tokens x[0..N-1]: inputs x[start:end] predict targets start+1..end, of
    which first_scored..end are scored. Every target 1..N-1 is scored exactly once: the first window scores all of
    its targets, each later one its last `stride`; the last window ends at N-1 with a full-length context."""
    last = n_tokens - 1
    windows, start, scored_to = [], 0, 0
    while scored_to < last:
        if start + seq_len > last:
            start = max(0, last - seq_len)
        end = min(start + seq_len, last)
        windows.append((start, end, scored_to + 1))
        scored_to = end
        start += stride
    return np.asarray(windows, dtype=np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class Slot:
    """Causal, context-only SLOT: per window, a delta [1, d] on the final residual stream and a logit
    bias [1, V], optimized on that window's already-scored context, then used to score its slice and discarded."""
    steps: int = Config.slot_steps
    lr: float = Config.slot_lr
    lr_min: float = Config.slot_lr_min
    focal: int = Config.slot_focal   # context targets in the loss: the last `focal` before the scored slice; 0 = all
    bias: bool = Config.slot_bias
    warm_start: float = Config.slot_warm_start   # start at alpha x the previous batch's mean final delta and bias

    @classmethod
    def from_config(cls, cfg: "Config") -> "Slot | None":
        return settings_view(cls, cfg, "slot_") if cfg.slot_steps else None


@dataclass(frozen=True)
class Ttt:
    """Score-first test-time training: the stream is cut into chunks of `chunk_tokens` (with reset
    "document", also after every BOS, where the weights go back to the artifact's); each chunk is scored first, then,
    unless it is the last, trained on for `epochs` SGD steps of all weights (momentum, cosine learning rate over the
    chunks, gradient clipping), with the gradients of all ranks averaged."""
    epochs: int = Config.ttt_epochs
    chunk_tokens: int = Config.ttt_chunk_tokens
    lr: float = Config.ttt_lr
    momentum: float = Config.ttt_momentum
    clip: float = Config.ttt_clip
    reset: str = Config.ttt_reset

    @classmethod
    def from_config(cls, cfg: "Config") -> "Ttt | None":
        return settings_view(cls, cfg, "ttt_") if cfg.ttt_epochs else None


@dataclass(frozen=True)
class Lora:
    """Per-document LoRA TTT (document mode; #1530, #1767, #1855): each row of a batch is one document with its own
    adapters (see Adapters), walked in chunks of EVAL_STRIDE targets: score the chunk, then one Adam step (beta1 0)
    on that chunk's mean loss, except after the document's last chunk."""
    rank: int = Config.lora_rank
    alpha: float = Config.lora_alpha
    lr: float = Config.lora_lr
    weight_decay: float = Config.lora_weight_decay
    beta2: float = Config.lora_beta2
    batch: int = Config.lora_batch
    carry: bool = Config.lora_carry

    @classmethod
    def from_config(cls, cfg: "Config") -> "Lora | None":
        return settings_view(cls, cfg, "lora_") if cfg.lora_rank else None


@dataclass(frozen=True)
class Phases:
    """Phased global SGD (#1626, #1855): the first `docs` documents of the stream are scored in `count` groups; after
    each group every rank pauses and trains all weights for one epoch on every document scored so far (each document
    its own rows, so the loss never crosses a document), then the adapters restart."""
    docs: int = Config.phase_docs
    count: int = Config.phase_count
    lr: float = Config.phase_lr
    momentum: float = Config.phase_momentum
    clip: float = Config.phase_clip
    tokens: int = Config.phase_tokens

    @classmethod
    def from_config(cls, cfg: "Config") -> "Phases | None":
        return settings_view(cls, cfg, "phase_") if cfg.phase_count and cfg.phase_docs else None


@dataclass(frozen=True)
class Geometry:
    """Where the windows fall: at most `seq_len` tokens of context, a new window (stream mode) or chunk (document
    mode) every `stride` targets, `batch_windows` windows per forward (stream mode; document mode: Lora.batch)."""
    seq_len: int = Config.eval_seq_len
    stride: int = Config.eval_stride
    batch_windows: int = Config.eval_batch_windows

    @classmethod
    def from_config(cls, cfg: "Config") -> "Geometry":
        return settings_view(cls, cfg, "eval_")


@dataclass(frozen=True)
class Adaptation:
    """What adapts while the evaluation scores, and its deadline (None: no budget guard)."""
    mode: str = "stream"
    slot: Slot | None = None
    ttt: Ttt | None = None          # stream mode's chunked all-weight SGD
    lora: Lora | None = None        # document mode's per-document adapters
    phases: Phases | None = None    # document mode's global SGD pauses
    deadline: float | None = None

    @classmethod
    def from_config(cls, cfg: "Config", deadline: float | None) -> "Adaptation":
        doc = cfg.eval_mode == "document"
        return cls(cfg.eval_mode, Slot.from_config(cfg), None if doc else Ttt.from_config(cfg),
                   Lora.from_config(cfg) if doc else None, Phases.from_config(cfg) if doc else None, deadline)


@dataclass
class EvalResult:
    loss: float            # mean NLL per scored target, nats
    bpb: float
    tokens: int
    bytes: int
    seconds: float
    nll: np.ndarray | None = None   # per target, stream order (when asked)
    slot_steps_mean: float = 0.0    # SLOT steps per window actually run (the budget guard may lower them)
    slot_steps_min: int = 0
    ttt_epochs_mean: float = 0.0    # TTT steps actually run, per chunk that could train (all but the last)
    ttt_chunks_trained: int = 0
    budget_cuts: int = 0            # times the ranks agreed to lower SLOT steps or TTT epochs (LoRA steps)
    ttt_seconds: float = 0.0        # of `seconds`: the TTT steps (this rank's)


@dataclass
class RankEval:
    """One rank's share of an evaluation, carried from batch to batch and chunk to chunk: the forward it scores with,
    its budget, SLOT's warm start, and its sums before the all-reduce."""
    budget: "EvalBudget"
    hidden: typing.Callable | None = None   # the model's hidden(), compiled or not (None: model.hidden)
    want_nll: bool = False           # keep every NLL and its target index (NLL_DUMP_PATH, the tests)
    prev: tuple | None = None        # the previous batch's mean final (delta, bias): the warm start
    nll_sum: float = 0.0
    tokens: int = 0
    bytes: int = 0
    nll: list = dataclasses.field(default_factory=list)
    pos: list = dataclasses.field(default_factory=list)   # target index of each nll (for the stream-order dump)
    windows: int = 0
    slot_step_sum: int = 0          # sum over windows of the SLOT steps used
    slot_steps_min: int = 1 << 30
    plans: list = dataclasses.field(default_factory=list)   # the agreed (SLOT steps, TTT epochs) of every round
    adapters: typing.Any = None     # document mode: the per-document LoRA (Adapters) and its Adam second moments
    second: list = dataclasses.field(default_factory=list)
    slot_step: typing.Callable | None = None   # slot_step_fn's step, compiled or not (None: built uncompiled)
    slot_rows: int = 0              # SLOT's fixed batch rows (short batches are padded to it)


def slot_context_weights(first: torch.Tensor, width: int, focal: int) -> torch.Tensor:
    """[B, W] loss weights: 1/n on the n context targets strictly before each window's scored slice (the last `focal`
    of them if focal > 0), 0 elsewhere. Each window's weights sum to 1 (or 0 without context): the batch loss is a
    sum of per-window means, so no window's step size depends on another window."""
    pos = torch.arange(width, device=first.device)[None, :]
    lo = (first - focal).clamp_min(0)[:, None] if focal else torch.zeros_like(first)[:, None]
    ctx = (pos >= lo) & (pos < first[:, None])
    return ctx / ctx.sum(1, keepdim=True).clamp_min(1)


def slot_init(n: int, d: int, vocab: int, prev: tuple | None, alpha: float,
              like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window parameters [n, 1, d] and [n, 1, V]: zero, or alpha x the previous batch's mean (already-scored
    context)."""
    delta = torch.zeros(n, 1, d, dtype=like.dtype, device=like.device)
    bias = torch.zeros(n, 1, vocab, dtype=like.dtype, device=like.device)
    if prev is not None and alpha:
        delta += alpha * prev[0]
        bias += alpha * prev[1]
    return delta, bias


def slot_logits(model: GPT, h: torch.Tensor, delta: torch.Tensor, bias: torch.Tensor | None,
                lora: "Adapters | None" = None) -> torch.Tensor:
    """Logits of h [B, C, d] (a column range of B windows): softcap(head(h + delta)) + bias, with delta [B, 1, d]
    and bias [B, 1, V]. Broadcasting keeps each window's parameters to itself; the backward is a plain reduction."""
    logits = model.head(h + delta, lora)
    return logits + bias if bias is not None else logits


def slot_step_fn(model: GPT, lora: "Adapters | None", run: Run):
    """One AdamW step (no weight decay, no clipping) of every window's (delta, bias), as a pure function: the
    gradient by torch.func.grad, the logits in the compute dtype (bf16 on a GPU) with a float32 loss. Compiled
    (COMPILE) once per shape, it fuses the full-vocabulary softmax into its neighbours instead of keeping float32
    copies for a backward. AdamW is element-wise and the loss is a sum of per-window means, so the B windows are B
    independent optimizations side by side."""
    def loss(params, h, y, w):
        logits = slot_logits(model, h, params[0], params[1] if len(params) > 1 else None, lora)
        return (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none") * w.flatten()).sum()

    grad = torch.func.grad(loss)

    def step(h, y, w, params, moments, lr, k):
        with run.autocast():
            grads = grad(params, h, y, w)
        b1, b2, eps = 0.9, 0.999, 1e-8
        new_params, new_moments = [], []
        for p, g, (m, v) in zip(params, grads, moments):
            g = g.to(p.dtype)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            new_params.append(p - lr * (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps))
            new_moments.append((m, v))
        return tuple(new_params), tuple(new_moments)

    return run.compile(step)


def slot_context(h, y, first, focal: int):
    """The columns SLOT fits on, in a fixed shape [B, K] whatever the windows' slices: K = `focal` columns ending
    just before each window's first scored target, or (focal 0) all W columns; weights from slot_context_weights,
    0 on every column that is not context."""
    width = y.size(1)
    weights = slot_context_weights(first, width, focal)
    if not focal:
        return h, y, weights
    k = min(focal, width)
    cols = first[:, None] - k + torch.arange(k, device=first.device)[None, :]
    idx = cols.clamp(0, width - 1)
    w = weights.gather(1, idx) * (cols >= 0)
    return h.gather(1, idx[..., None].expand(-1, -1, h.size(-1))), y.gather(1, idx), w


def slot_fit(model: GPT, h, y, first, slot: Slot, steps: int, state: "RankEval", lora: "Adapters | None" = None):
    """One batch's per-window delta and bias: a warm start (state.prev) or zero, then `steps` AdamW steps with a
    cosine learning rate on each window's context (slot_context), padded to state.slot_rows rows so that every batch
    has one shape. Returns (delta, bias) and leaves the next batch's warm start in state.prev; (None, None) when the
    budget cut the steps to 0: the batch is then scored plain, never with a stale warm start."""
    if steps == 0:
        return None, None
    n = h.size(0)
    delta, bias = slot_init(n, h.size(-1), model.tok_emb.weight.size(0), state.prev, slot.warm_start, h)
    hc, yc, w = slot_context(h, y, first, slot.focal)
    pad = max(0, state.slot_rows - n)
    if pad:    # rows without context: zero weight, so they change nothing and take no step
        hc, yc, w = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]) * 0)) for t in (hc, yc, w))
        delta, bias = (torch.cat((t, t[-1:].expand(pad, *t.shape[1:]))) for t in (delta, bias))
    params = (delta, bias) if slot.bias else (delta,)
    moments = tuple((torch.zeros_like(p), torch.zeros_like(p)) for p in params)
    step = state.slot_step or slot_step_fn(model, lora, Run())
    for k in range(steps):    # under no_grad always (one compiled graph): torch.func.grad ignores the outer mode
        lr = slot.lr_min + 0.5 * (slot.lr - slot.lr_min) * (1 + math.cos(math.pi * k / steps))
        with torch.no_grad():
            params, moments = step(hc, yc, w, params, moments, torch.tensor(lr, dtype=h.dtype, device=h.device),
                                   torch.tensor(k + 1.0, dtype=h.dtype, device=h.device))
    delta, bias = params[0][:n], params[1][:n] if slot.bias else None
    has_ctx = w[:n].sum(1) > 0
    if has_ctx.any():
        state.prev = (delta[has_ctx].mean(0), bias[has_ctx].mean(0) if bias is not None else 0.0)
    return delta, bias


# Which knob the budget guard lowers first: the one that costs more seconds per bpb it gains (logs/eval_study).
# Stream mode: TTT epochs first. Document mode: SLOT steps first (the LoRA is one on/off knob and worth more: #1855).
BUDGET_CUT_ORDER = {"stream": ("ttt", "slot"), "document": ("slot", "ttt")}


class EvalBudget:
    """One deadline for everything in the eval phase, one per rank share. It measures the forward cost per window,
    the cost of one SLOT step per window and of one TTT epoch per trained token (document mode: per forward column,
    and the LoRA steps as the epoch, 1 = on), projects what this share has left, and when that would not fit proposes
    fewer TTT epochs or SLOT steps in the mode's BUDGET_CUT_ORDER; agree_plan makes the smallest proposal every
    rank's.
    The first batch and the first trained chunk pay for compilation and are not measured."""

    def __init__(self, deadline: float | None, steps: int, epochs: int, windows: int, tokens: int,
                 mode: str = "stream") -> None:
        self.deadline, self.steps, self.epochs, self.order = deadline, steps, epochs, BUDGET_CUT_ORDER[mode]
        self.configured = (steps, epochs)
        self.windows_left, self.tokens_left = windows, tokens   # this rank's windows to score, targets to train on
        self.fwd = self.step = self.epoch = None               # s per window, per window and step, per epoch and token
        self.batches = self.trained = self.cuts = 0

    @staticmethod
    def _ema(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new

    def observe_batch(self, n: int, fwd_s: float, slot_s: float, steps: int) -> None:
        self.windows_left -= n
        self.batches += 1
        if self.batches > 1:
            self.fwd = self._ema(self.fwd, fwd_s / n)
            if steps:
                self.step = self._ema(self.step, slot_s / (n * steps))

    def observe_chunk(self, seconds: float, epochs: int, tokens: int) -> None:
        self.tokens_left -= tokens
        self.trained += bool(epochs)
        if epochs and self.trained > 1:
            self.epoch = self._ema(self.epoch, seconds / (epochs * tokens))

    def need(self, steps: int, epochs: int) -> float:
        return (max(0, self.windows_left) * ((self.fwd or 0.0) + steps * (self.step or 0.0))
                + max(0, self.tokens_left) * epochs * (self.epoch or 0.0))

    def plan(self, where: str) -> tuple[int, int]:
        """(SLOT steps, TTT epochs) that fit in what is left; the knob whose cost is not measured yet is not cut."""
        if self.deadline is None:
            return self.steps, self.epochs
        before, left = (self.steps, self.epochs), self.deadline - time.perf_counter()
        while self.need(self.steps, self.epochs) > left:
            for knob in self.order:
                if knob == "ttt" and self.epochs and self.epoch is not None:
                    self.epochs -= 1
                    break
                if knob == "slot" and self.steps and self.step is not None:
                    self.steps -= 1
                    break
            else:
                break
        if (self.steps, self.epochs) != before:
            log(f"eval_budget: rank {where} proposes SLOT steps {before[0]} -> {self.steps}, TTT epochs {before[1]} -> "
                f"{self.epochs} ({left:.1f}s left, {self.windows_left} windows and {self.tokens_left} TTT targets to "
                f"go; per window {1000 * (self.fwd or 0):.2f}ms + {1000 * (self.step or 0):.3f}ms per step, "
                f"{1e6 * (self.epoch or 0):.2f}us per epoch and target)", console=False)
        return self.steps, self.epochs


def agree_plan(states: dict, run: Run, where: str) -> tuple[int, int]:
    """The (SLOT steps, TTT epochs) every rank uses for the next round: each rank's budget proposes what fits its
    own share, the smallest proposal wins everywhere (no rank scores with other settings than its peers), and every
    budget then counts with the agreed values. Called at the same points on every rank (the rounds are computed from
    the static shares), so the all-reduce always pairs up."""
    first = next(iter(states.values()))
    before = first.plans[-1] if first.plans else first.budget.configured
    proposals = [states[r].budget.plan(f"{r} at {where}") for r in states]
    local = torch.tensor([min(p[0] for p in proposals), min(p[1] for p in proposals)], device=run.device)
    agreed = tuple(int(v) for v in run.all_reduce(local, dist.ReduceOp.MIN).tolist())
    if agreed != before:
        log(f"eval_budget: WARNING cut SLOT steps {before[0]} -> {agreed[0]}, TTT epochs {before[1]} -> {agreed[1]} "
            f"at {where}, agreed by all ranks")
    for state in states.values():
        state.budget.steps, state.budget.epochs = agreed
        state.budget.cuts += agreed != before
        state.plans.append(agreed)
    return agreed


def scored_log_probs(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The full-vocabulary log-probabilities of the scored targets at stream indices `positions`: every scored
    distribution passes here once (the causality harness wraps this function to keep each row)."""
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def eval_shard(model: GPT, tokens: torch.Tensor, windows: np.ndarray, tables: ByteTables, run: Run,
               batch_windows: int, slot: Slot | None, state: RankEval) -> RankEval:
    """Score `windows` (one rank's contiguous share, in stream order) with the agreed SLOT steps, adding to `state`,
    which carries the budget, the warm start and the sums on to the next call."""
    hidden_fn, device, out = state.hidden or model.hidden, run.device, state
    tables = tables.to(device)
    n_batches = (len(windows) + batch_windows - 1) // batch_windows
    for i in range(n_batches):
        w = windows[i * batch_windows:(i + 1) * batch_windows]
        width = int(w[0, 1] - w[0, 0])      # all windows have the same length (see build_windows)
        x = torch.stack([tokens[s:e] for s, e, _ in w]).to(device)
        y = torch.stack([tokens[s + 1:e + 1] for s, e, _ in w]).to(device)
        first_np = w[:, 2] - 1 - w[:, 0]                                  # position of the first scored target
        first = torch.as_tensor(first_np, device=device)
        pos = torch.arange(width, device=device)[None, :]
        mask = pos >= first[:, None]
        steps = state.budget.steps if slot else 0
        t0 = time.perf_counter()
        pad = batch_windows - len(w)   # keep one batch shape: a compiled forward would recompile for a short batch
        with run.autocast():
            h = hidden_fn(torch.cat((x, x[-1:].expand(pad, -1))) if pad else x)[:len(w)]
        h = h.float() if h.dtype in (torch.bfloat16, torch.float16) else h
        delta = bias = None
        run.sync()                     # the forward runs asynchronously: without this its time would count as SLOT's
        t1 = time.perf_counter()
        if slot is not None:
            delta, bias = slot_fit(model, h, y, first, slot, steps, state)
        run.sync()
        t2 = time.perf_counter()
        f0 = int(first_np.min())       # the head runs only on the columns that hold scored targets
        logits = slot_logits(model, h[:, f0:], delta, bias) if delta is not None else model.head(h[:, f0:])
        target_pos = (torch.as_tensor(w[:, 0], device=device)[:, None] + 1 + pos)[mask]
        logp = scored_log_probs(logits[mask[:, f0:]], target_pos)
        target = y[mask]
        add_scores(out, logp, target, target_pos, tables.count(x[mask], target, target_pos))
        out.windows += len(w)
        if slot is not None:
            out.slot_step_sum += steps * len(w)
            out.slot_steps_min = min(out.slot_steps_min, steps)
        state.budget.observe_batch(len(w), (t1 - t0) + (time.perf_counter() - t2), t2 - t1, steps)
        log.mark()
    return out


def add_scores(out: RankEval, logp: torch.Tensor, target: torch.Tensor, positions: torch.Tensor,
               n_bytes: torch.Tensor) -> None:
    """Add scored rows (full log-probabilities from scored_log_probs) to a rank's sums."""
    nll = -logp.gather(1, target[:, None])[:, 0].double()
    out.nll_sum += float(nll.sum())
    out.tokens += nll.numel()
    out.bytes += int(n_bytes.sum())
    if out.want_nll:
        out.nll.append(nll.cpu())
        out.pos.append(positions.cpu())


def eval_chunks(tokens: torch.Tensor, windows: np.ndarray, ttt: Ttt | None) -> list[tuple[int, int, int, int]]:
    """(first window, end window, first target, end target) of each chunk, in stream order. A window belongs to the
    chunk of its first scored target, so it is scored before any training on a token it scores; training on a
    chunk uses only its own targets, all of which are scored by then (by its windows or earlier ones). With reset
    "document" a chunk also starts at the target *after* each BOS: the cut then depends on the BOS token, which is
    context for every target of the new chunk; cutting *at* the BOS would make the BOS target's own weights depend
    on it."""
    n = len(tokens)
    if ttt is None:
        return [(0, len(windows), 1, n)]
    starts = np.arange(0, n, ttt.chunk_tokens)
    if ttt.reset == "document":
        after_bos = (tokens[:-1] == BOS_ID).nonzero().flatten().numpy() + 1
        starts = np.union1d(starts, after_bos)
    owner = np.searchsorted(starts, windows[:, 2], side="right") - 1     # the chunk of each window's first target
    bounds = np.searchsorted(owner, np.arange(len(starts) + 1))
    ends = [int(t) for t in starts[1:]] + [n]
    return [(int(bounds[c]), int(bounds[c + 1]), max(1, int(starts[c])), ends[c]) for c in range(len(starts))]


def ttt_batches(tokens: torch.Tensor, a: int, b: int, seq_len: int, share: tuple[int, int],
                device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's training sequences of the chunk with targets a..b-1 (inputs a-1..b-2): the chunk's sequences of
    seq_len pairs, the last padded with ignored targets, split across ranks; in batches of at most 32 sequences."""
    n_seq = -(-(b - a) // seq_len)
    lo, hi = share[0] * n_seq // share[1], (share[0] + 1) * n_seq // share[1]
    out = []
    for k0 in range(lo, hi, 32):
        xs, ys = [], []
        for k in range(k0, min(hi, k0 + 32)):
            t0, t1 = a + k * seq_len, min(b, a + (k + 1) * seq_len)
            x, y = tokens[t0 - 1:t1 - 1], tokens[t0:t1]
            pad = seq_len - len(x)
            xs.append(F.pad(x, (0, pad), value=BOS_ID + 1))   # not BOS: each would start a document (DOC_ATTENTION)
            ys.append(F.pad(y, (0, pad), value=-100))
        out.append((torch.stack(xs).to(device), torch.stack(ys).to(device)))
    return out


def ttt_compiled(model: GPT, ttt: Ttt, seq_len: int, rank: int, world: int, run: Run):
    """The TTT step's forward, compiled (COMPILE) and warmed up on random tokens, never on validation tokens: one
    forward and backward at each batch shape of this rank's share of a full chunk; the gradients are dropped and
    no weight moves. The warm-up runs inside the eval phase, so the budget pays for it."""
    fn = run.compile(model)
    n_seq = -(-ttt.chunk_tokens // seq_len)
    size = (rank + 1) * n_seq // world - rank * n_seq // world
    g = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for n in sorted({min(32, size - k) for k in range(0, size, 32)}):
            x, y = torch.randint(0, model.tok_emb.weight.size(0), (2, n, seq_len), generator=g).to(run.device)
            with run.autocast():   # inputs and targets apart, as in training (dynamo guards on their aliasing)
                loss = fn(x, y, reduction="sum")
            loss.backward()
    for p in model.parameters():
        p.grad = None
    return fn


def ttt_train(model: GPT, opt, tokens: torch.Tensor, chunk: tuple, ttt: Ttt, epochs: int, lr: float,
              seq_len: int, ranks: list[int], world: int, run: Run) -> None:
    """`epochs` SGD steps on one scored chunk. Each (simulated) rank adds the gradient of its sequences' summed loss
    over the chunk's target count; one all-reduce makes it the chunk's mean gradient on every rank, whatever the
    split, so every rank's weights stay the same."""
    _, _, a, b = chunk
    params = [p for g in opt.param_groups for p in g["params"]]
    shares = [ttt_batches(tokens, a, b, seq_len, (r, world), run.device) for r in ranks]
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)    # only this chunk's gradient: nothing left over from anything else
    for _ in range(epochs):
        with torch.enable_grad():
            for batches in shares:
                for x, y in batches:
                    with run.autocast():
                        loss = model(x, y, reduction="sum") / (b - a)
                    loss.backward()
        if run.distributed:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = run.all_reduce(torch.cat([g.flatten() for g in grads]))
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad = g.view_as(p)
        torch.nn.utils.clip_grad_norm_(params, ttt.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)


def warm_slot(model: GPT, step, slot: Slot, rows: int, width: int, run: Run) -> None:
    """Compile SLOT's step at one batch shape on random values (never validation tokens); nothing is kept."""
    t0 = time.perf_counter()
    w = model.tok_emb.weight
    k = min(slot.focal, width) if slot.focal else width
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, k, w.size(1), generator=g).to(run.device)
    y = torch.randint(0, w.size(0), (rows, k), generator=g).to(run.device)
    params = (torch.zeros(rows, 1, w.size(1), device=run.device), torch.zeros(rows, 1, w.size(0), device=run.device))
    params = params if slot.bias else params[:1]
    moments = tuple((torch.zeros_like(p), torch.zeros_like(p)) for p in params)
    one = torch.ones((), device=run.device)
    with torch.no_grad():
        step(h, y, torch.full((rows, k), 1.0 / k, device=run.device), params, moments, one * slot.lr, one)
    run.sync()
    log(f"eval_compile slot_time:{1000 * (time.perf_counter() - t0):.0f}ms rows:{rows} columns:{k}")


def eval_forward(model: GPT, windows: np.ndarray, batch_windows: int, run: Run):
    """The scoring forward (model.hidden), compiled when COMPILE and then warmed up on one batch of random tokens at
    the eval's shape (never on validation tokens), so that its compile time is logged apart from the scoring."""
    fn = run.compile(model.hidden)
    if run.compiled and len(windows):
        t0 = time.perf_counter()
        shape = (batch_windows, int(windows[0, 1] - windows[0, 0]))
        x = torch.randint(0, model.tok_emb.weight.size(0), shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), run.autocast():
            fn(x.to(run.device))
        run.sync()
        log(f"eval_compile forward_time:{1000 * (time.perf_counter() - t0):.0f}ms")
    return fn


# Batches each rank scores between two budget agreements (a tiny all-reduce): small enough to react within seconds.
# The document mode agrees before every batch of documents (one batch is many chunk steps).
BUDGET_ROUND_BATCHES = 8


def evaluate(model: GPT, tokens: torch.Tensor, tables: ByteTables, run: Run, geo: Geometry,
             adapt: Adaptation = Adaptation(), want_nll: bool = False) -> EvalResult:
    """Score every target of `tokens` once, in the stream mode (below) or the document mode (evaluate_documents).
    Stream mode: chunk by chunk in stream order (one chunk without TTT); each chunk's windows are split across the
    ranks' shares (Run.eval_shares) in contiguous order, scored in rounds of BUDGET_ROUND_BATCHES batches with SLOT
    steps agreed before each round, and with TTT each chunk but the last is trained on after it is scored. The
    forwards are compiled when the run compiles (COMPILE)."""
    if adapt.mode == "document":
        return evaluate_documents(model, tokens, tables, run, geo, adapt, want_nll)
    t0 = time.perf_counter()
    slot, ttt = adapt.slot, adapt.ttt
    windows = build_windows(len(tokens), geo.seq_len, geo.stride)
    chunks = eval_chunks(tokens, windows, ttt)
    # The budget's counts come from the fixed grid of chunk_tokens, which depends on the stream's length alone: with
    # per-document chunks the real counts would tell every chunk how many documents lie ahead.
    grid = eval_chunks(tokens, windows, dataclasses.replace(ttt, reset="never")) if ttt else chunks
    ranks, world = run.eval_shares()
    hidden_fn = eval_forward(model, windows, geo.batch_windows, run)
    slot_step = slot_step_fn(model, None, run) if slot else None
    if slot and run.compiled and len(windows):
        warm_slot(model, slot_step, slot, geo.batch_windows, int(windows[0, 1] - windows[0, 0]), run)

    def share(chunk, r):   # rank r's contiguous part of the chunk's windows
        return chunk[0] + (chunk[1] - chunk[0]) * r // world, chunk[0] + (chunk[1] - chunk[0]) * (r + 1) // world

    states = {}
    for r in ranks:
        windows_r = sum(hi - lo for lo, hi in (share(c, r) for c in grid))
        budget = EvalBudget(adapt.deadline, slot.steps if slot else 0, ttt.epochs if ttt else 0, windows_r,
                            grid[-1][2] - 1)
        states[r] = RankEval(budget, hidden_fn, want_nll, slot_step=slot_step, slot_rows=geo.batch_windows)
    progress_end = grid[-1][2]      # where the last grid chunk starts: the end of the cosine, by position
    base = {n: p.detach().clone() for n, p in model.named_parameters()} if ttt else None
    opt = torch.optim.SGD(model.parameters(), lr=ttt.lr, momentum=ttt.momentum) if ttt else None
    # per-document resets would need a graph per chunk length: that mode's TTT stays eager
    compiled = run.compiled and ttt is not None and ttt.reset == "never"
    t1 = time.perf_counter()
    train_fn = ttt_compiled(model, ttt, geo.seq_len, ranks[0], world, run) if compiled else model
    if compiled:
        log(f"eval_compile ttt_time:{1000 * (time.perf_counter() - t1):.0f}ms")
    epochs_run, ttt_s, per_round = [], 0.0, BUDGET_ROUND_BATCHES * geo.batch_windows
    for c, chunk in enumerate(chunks):
        if ttt and ttt.reset == "document" and c and tokens[chunk[2] - 1] == BOS_ID:
            restore_weights(model, base)      # a new document: back to the artifact's weights, no momentum
            opt.state.clear()
        # every rank knows every share, so every rank runs the same number of rounds (and agreements)
        longest = max(np.diff(share(chunk, r))[0] for r in range(world))
        for k in range(0, max(longest, 1), per_round):
            agree_plan(states, run, f"chunk {c} window {k}")
            for r in ranks:
                lo, hi = share(chunk, r)
                eval_shard(model, tokens, windows[min(lo + k, hi):min(lo + k + per_round, hi)], tables, run,
                           geo.batch_windows, slot, states[r])
        if ttt is None or c == len(chunks) - 1:
            continue
        epochs = agree_plan(states, run, f"chunk {c}")[1]
        run.sync()
        t1 = time.perf_counter()
        progress = min(1.0, (chunk[2] if c else 0) / progress_end)     # c / (chunks - 1) on the grid
        lr = ttt.lr * 0.5 * (1 + math.cos(math.pi * progress))
        if epochs:
            ttt_train(train_fn, opt, tokens, chunk, ttt, epochs, lr, geo.seq_len, ranks, world, run)
        run.sync()
        for r in ranks:
            states[r].budget.observe_chunk(time.perf_counter() - t1, epochs, chunk[3] - chunk[2])
        ttt_s += time.perf_counter() - t1
        epochs_run.append(epochs)
    if base is not None:       # the artifact's weights come back: nothing trained here outlives the evaluation
        restore_weights(model, base)
    return dataclasses.replace(gather_result(states, ranks, run, slot, epochs_run, t0), ttt_seconds=ttt_s)


# ---- document mode: each document alone, per-document LoRA, phased global SGD ------------------------------------

class Adapters(nn.Module):
    """The document mode's LoRA: for every pass of the block loop, adapters on Q, K, V, the attention output and the
    MLP output (both in parallel, from the normed input of their sublayer), and one on the LM head (added before the
    soft-cap); each holds `rows` independent pairs, one per document row: delta = (x A^T) B^T x alpha / rank. B starts
    at zero (the adapted model starts as the artifact's), A uniform(+-1/sqrt(in)) from a fixed seed, the same in
    every row: a document's scores do not depend on the row or batch it lands in."""
    KINDS = "qkvom"

    def __init__(self, model: GPT, lora: Lora, rows: int) -> None:
        super().__init__()
        w = model.tok_emb.weight
        d, vocab, kv = w.size(1), w.size(0), model.blocks[0].attn.c_k.weight.size(0)
        out = {"q": d, "k": kv, "v": kv, "o": d, "m": d}
        dims = [(d, out[k]) for _ in model.schedule for k in self.KINDS] + [(d, vocab)]
        self.rows, self.scale = rows, lora.alpha / lora.rank
        self.A = nn.ParameterList(nn.Parameter(torch.zeros(rows, lora.rank, i, dtype=w.dtype, device=w.device))
                                  for i, _ in dims)
        self.B = nn.ParameterList(nn.Parameter(torch.zeros(rows, o, lora.rank, dtype=w.dtype, device=w.device))
                                  for _, o in dims)
        self.restart(keep_a=False)

    @torch.no_grad()
    def restart(self, keep_a: bool) -> None:
        g = torch.Generator().manual_seed(0)
        for a, b in zip(self.A, self.B):
            b.zero_()
            if not keep_a:
                bound = 1 / math.sqrt(a.size(-1))
                a.copy_(torch.rand(a.shape[1:], generator=g, dtype=torch.float64).mul(2 * bound).sub(bound))

    def delta(self, k: int, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(x, self.A[k].transpose(1, 2)), self.B[k].transpose(1, 2)) * self.scale

    def at(self, i: int) -> "PassAdapters":
        return PassAdapters(self, i)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.delta(len(self.A) - 1, x)


class PassAdapters:
    """The adapters of pass i, called by the attention and the block as ad(kind, x)."""

    def __init__(self, adapters: Adapters, i: int) -> None:
        self.adapters, self.i = adapters, i

    def __call__(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters.delta(len(Adapters.KINDS) * self.i + Adapters.KINDS.index(kind), x)


@torch.no_grad()
def adapters_step(adapters: Adapters, second: list[torch.Tensor], rows: torch.Tensor, lora: Lora, k: int) -> None:
    """One Adam step (beta1 0, eps 1e-10, decoupled weight decay) of the rows that train (`rows` [R] 0/1): Adam is
    element-wise and each row's loss is its own document's, so every row is an independent optimization."""
    keep = rows.view(-1, 1, 1).to(adapters.A[0].dtype)
    for p, v in zip(adapters.parameters(), second):
        if p.grad is None:
            continue
        v.mul_(1 - keep * (1 - lora.beta2)).addcmul_(p.grad, p.grad, value=1 - lora.beta2)
        step = p.grad / ((v / (1 - lora.beta2 ** k)).sqrt() + 1e-10) + lora.weight_decay * p
        p.sub_(lora.lr * keep * step)
        p.grad = None


def document_spans(tokens: torch.Tensor) -> np.ndarray:
    """[K, 2] rows (a, b): document k's inputs a..b-1 predict its targets a+1..b. A document runs from a BOS (or the
    stream's first token) to the next BOS, whose prediction it scores: every target 1..N-1 once, each predicted from
    its own document's tokens only."""
    n = len(tokens)
    bos = (tokens[1:n - 1] == BOS_ID).nonzero().flatten().numpy() + 1
    return np.stack((np.concatenate(([0], bos)), np.concatenate((bos, [n - 1])))).T.astype(np.int64)


def doc_width(end: int, geo: Geometry) -> int:
    """The forward's width for a chunk whose longest row ends at target `end`: the smallest of seq_len / 2^k (k <= 3)
    that holds it, so a handful of shapes are compiled once (in the warm-up) and short documents stay cheap."""
    widths = sorted({max(1, geo.seq_len >> k) for k in range(4)})
    return next((w for w in widths if w >= end), geo.seq_len)


def doc_cost(length: int, geo: Geometry) -> int:
    """Forward columns a document of `length` targets costs, chunk by chunk: known before scoring (the balance)."""
    return sum(doc_width(min(length, (c + 1) * geo.stride), geo) for c in range(-(-length // geo.stride)))


def assign_documents(lengths: np.ndarray, world: int, geo: Geometry) -> list[np.ndarray]:
    """Static longest-first balance: documents by cost, descending, each to the least loaded rank (ties: lowest
    rank). Every rank computes the same assignment, with no shared file; within a rank, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    loads, out = [0] * world, [[] for _ in range(world)]
    for i in order:
        r = min(range(world), key=lambda q: (loads[q], q))
        out[r].append(i)
        loads[r] += doc_cost(int(lengths[i]), geo)
    return [np.asarray(o, dtype=np.int64) for o in out]


def document_groups(n_docs: int, phases: Phases | None) -> list[tuple[int, int]]:
    """[first, end) document ranges in stream order; a phase follows every group but the last. A document's group
    depends on how many documents precede it, never on its own tokens or later ones."""
    if phases is None:
        return [(0, n_docs)]
    cuts = sorted({min(n_docs, phases.docs * (k + 1) // phases.count) for k in range(phases.count)} | {0, n_docs})
    return list(zip(cuts[:-1], cuts[1:]))


def score_document_batch(model: GPT, tokens: torch.Tensor, spans: np.ndarray, tables: ByteTables, run: Run,
                         geo: Geometry, adapt: Adaptation, state: "RankEval") -> None:
    """Score one batch of documents (one per row, right-padded, so plain causal attention is exact), chunk by chunk:
    each chunk's targets are predicted from at most seq_len tokens of their own document. With SLOT, a delta and bias
    per row are fitted on the row's already-scored context before the chunk is scored; with LoRA, after the chunk is
    scored, each row's adapters take one step on that chunk's loss (not after its last chunk)."""
    adapters, lora, slot, device = state.adapters, adapt.lora, adapt.slot, run.device
    rows = adapters.rows if adapters is not None else geo.batch_windows
    lengths = np.zeros(rows, dtype=np.int64)
    lengths[:len(spans)] = spans[:, 1] - spans[:, 0]
    starts = np.zeros(rows, dtype=np.int64)
    starts[:len(spans)] = spans[:, 0]
    n_chunks = -(-lengths // geo.stride)
    steps, train = (state.budget.steps if slot else 0), lora is not None and state.budget.epochs > 0
    if adapters is not None:
        adapters.restart(keep_a=lora.carry)
        for v in state.second:
            v.zero_()
    state.prev = None
    for c in range(int(n_chunks.max())):
        t0 = time.perf_counter()
        ends = np.minimum(lengths, (c + 1) * geo.stride)
        width = doc_width(int(ends.max()), geo)
        offset = np.maximum(0, ends - width)                   # the window's first input, within the document
        active = n_chunks > c
        first = np.where(active, c * geo.stride - offset, 0)   # column of the chunk's first target (0: no context)
        last = np.where(active, ends - offset, 0)
        col = np.arange(width)
        idx = starts[:, None] + offset[:, None] + col[None, :]
        inside = col[None, :] < (lengths - offset)[:, None]    # inputs of the row's own document
        inside, idx = torch.as_tensor(inside), torch.as_tensor(idx)
        # past its document a row holds a token that is not BOS (each BOS would start a document: DOC_ATTENTION)
        x = torch.where(inside, tokens[idx.clamp_max(len(tokens) - 2)], BOS_ID + 1).to(device)
        y = torch.where(inside, tokens[(idx + 1).clamp_max(len(tokens) - 1)], 0).to(device)
        scored = torch.as_tensor((col[None, :] >= first[:, None]) & (col[None, :] < last[:, None]), device=device)
        with torch.set_grad_enabled(adapters is not None), run.autocast():
            h = state.hidden(x, adapters)
        h_f = h.detach().float() if h.dtype in (torch.bfloat16, torch.float16) else h.detach()
        run.sync()
        t1 = time.perf_counter()
        delta = bias = None
        if slot is not None and first.max() > 0:    # some row has context (none: SLOT would change nothing)
            # SLOT reads the columns before the chunk, in one of the compiled widths (first <= it <= width)
            cw = min(width, doc_width(max(int(first.max()), geo.stride), geo))
            hc, yc = h_f[:, :cw].contiguous(), y[:, :cw].contiguous()   # the compiled step's layout
            delta, bias = slot_fit(model, hc, yc, torch.as_tensor(first, device=device), slot, steps, state, adapters)
            if delta is not None:   # the document mode's warm start: each row from its own previous chunk
                state.prev = (delta, bias if bias is not None else 0.0)
        run.sync()
        t2 = time.perf_counter()
        f0, f1 = int(first[active].min()), int(last.max())     # the head runs on the chunk's columns only
        with torch.no_grad():
            logits = (slot_logits(model, h_f[:, f0:f1], delta, bias, adapters) if delta is not None
                      else model.head(h_f[:, f0:f1], adapters))
        mask = scored[:, f0:f1]
        target_pos = torch.as_tensor(starts[:, None] + offset[:, None] + 1 + col[None, f0:f1], device=device)[mask]
        logp = scored_log_probs(logits[mask], target_pos)
        target = y[:, f0:f1][mask]
        add_scores(state, logp, target, target_pos, tables.count(x[:, f0:f1][mask], target, target_pos))
        t3 = time.perf_counter()
        learn = torch.as_tensor(active & (c < n_chunks - 1), device=device)
        cols = lora_columns(scored, torch.as_tensor(first, device=device), inside.to(device)) & learn[:, None]
        used = cols.any(0).nonzero().flatten()
        if train and len(used):
            c0, c1 = int(used[0]), int(used[-1]) + 1            # the head runs on the learned columns only
            with run.autocast():
                loss = F.cross_entropy(model.head(h[:, c0:c1], adapters).flatten(0, 1), y[:, c0:c1].flatten(),
                                       reduction="none").view(rows, -1)
            per_row = (loss * cols[:, c0:c1]).sum(1) / cols[:, c0:c1].sum(1).clamp_min(1)
            (per_row * learn).sum().backward()
            adapters_step(adapters, state.second, learn, lora, c + 1)
        elif adapters is not None:
            adapters.zero_grad(set_to_none=True)
        run.sync()
        units = rows * width
        state.budget.observe_batch(units, (t1 - t0) + (t3 - t2), t2 - t1, steps)
        state.budget.observe_chunk(time.perf_counter() - t3, int(train), units)
        log.mark()
    state.windows += len(spans)
    if slot is not None:
        state.slot_step_sum += steps * len(spans)
        state.slot_steps_min = min(state.slot_steps_min, steps)


def lora_columns(scored: torch.Tensor, first: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The columns a LoRA step learns from: exactly the chunk just scored (the causality harness swaps in leaky
    variants that also read later columns of the document)."""
    return scored


def phase_documents(spans: np.ndarray, g0: int, g1: int) -> np.ndarray:
    """The documents a phase trains on: every group scored so far by every rank, as #1626 / #1855 (the harness swaps
    in a leaky variant that reaches into the next group)."""
    return spans[:g1]


def phase_rows(tokens: torch.Tensor, spans: np.ndarray, seq_len: int) -> list[tuple[int, int]]:
    """(first target, end target) of each training row of a phase: each document cut into pieces of seq_len
    targets, so that the loss never reads across a document."""
    return [(a + 1 + k, min(b + 1, a + 1 + k + seq_len)) for a, b in spans.tolist() for k in range(0, b - a, seq_len)]


def phase_steps(tokens: torch.Tensor, spans: np.ndarray, phases: Phases, seq_len: int) -> list[list]:
    """A phase's steps: its documents' pieces (phase_rows) in stream order, in steps of at least phases.tokens
    targets."""
    steps, step = [], []
    for piece in phase_rows(tokens, spans, seq_len):
        step.append(piece)
        if sum(b - a for a, b in step) >= phases.tokens:
            steps, step = steps + [step], []
    return steps + ([step] if step else [])


def phase_train(model: GPT, fwd, tokens: torch.Tensor, spans: np.ndarray, phases: Phases, geo: Geometry,
                run: Run, rows: int) -> float:
    """One epoch of SGD on all weights over the documents `spans` (all scored by every rank by now): phase_steps,
    each step's rows split across the ranks (forwards of `rows` rows), gradients summed over all ranks and divided by
    the step's target count, clipped, cosine learning rate. Returns the seconds it took."""
    t0 = time.perf_counter()
    ranks, world = run.eval_shares()
    steps = phase_steps(tokens, spans, phases, geo.seq_len)
    model.requires_grad_(True)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=phases.lr, momentum=phases.momentum)
    for k, step in enumerate(steps):
        for g in opt.param_groups:
            g["lr"] = phases.lr * 0.5 * (1 + math.cos(math.pi * k / len(steps)))
        n_targets = sum(b - a for a, b in step)
        for r in ranks:
            mine = step[r * len(step) // world:(r + 1) * len(step) // world]
            for i in range(0, len(mine), rows):
                x, y = phase_batch(tokens, mine[i:i + rows], rows, geo.seq_len, run.device)
                with torch.enable_grad(), run.autocast():
                    loss = fwd(x, y, reduction="sum") / n_targets
                loss.backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = run.all_reduce(torch.cat([g.flatten() for g in grads])) if run.distributed else None
        if flat is not None:
            for p, g in zip(params, torch.split(flat, [p.numel() for p in params])):
                p.grad = g.view_as(p)
        torch.nn.utils.clip_grad_norm_(params, phases.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.mark()
    model.requires_grad_(False)
    return time.perf_counter() - t0


PHASE_ROWS = 32    # at most this many rows per forward of a phase step (the phase's one compiled shape)


def phase_batch(tokens: torch.Tensor, pieces: list[tuple[int, int]], rows: int, seq_len: int, device):
    """`rows` rows of inputs and targets (ignored past each piece, and in the padding rows)."""
    x = torch.full((rows, seq_len), BOS_ID + 1, dtype=torch.long)   # not BOS: see score_document_batch
    y = torch.full((rows, seq_len), -100, dtype=torch.long)
    for i, (a, b) in enumerate(pieces):
        x[i, :b - a], y[i, :b - a] = tokens[a - 1:b - 1], tokens[a:b]
    return x.to(device), y.to(device)


def document_warmup(model: GPT, adapters: Adapters | None, geo: Geometry, adapt: Adaptation, run: Run,
                    widths: list[int], phase_rows_count: int):
    """Compile the document mode's graphs on random tokens (never validation tokens): the forward at every width the
    documents' lengths will use, with the adapters' backward, and SLOT's step; the phase step's forward and backward.
    No weight moves. Returns the three functions."""
    hidden = run.compile(model.hidden)
    fwd = run.compile(model) if adapt.phases is not None else model
    slot_step = slot_step_fn(model, adapters, run) if adapt.slot is not None else None
    if not run.compiled:
        return hidden, fwd, slot_step
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    vocab, rows = model.tok_emb.weight.size(0), adapters.rows if adapters is not None else geo.batch_windows
    for width in widths:
        x = torch.randint(0, vocab, (rows, width), generator=g).to(run.device)
        with torch.set_grad_enabled(adapters is not None), run.autocast():
            h = hidden(x, adapters)
            if adapters is not None:
                model.head(h[:, -1:], adapters).float().sum().backward()
        if slot_step is not None:
            warm_slot(model, slot_step, adapt.slot, rows, width, run)
    if adapt.phases is not None:
        x, y = torch.randint(0, vocab, (2, phase_rows_count, geo.seq_len), generator=g).to(run.device)
        model.requires_grad_(True)
        with torch.enable_grad(), run.autocast():
            fwd(x, y, reduction="sum").backward()
        model.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    if adapters is not None:
        adapters.zero_grad(set_to_none=True)
    run.sync()
    log(f"eval_compile documents_time:{1000 * (time.perf_counter() - t0):.0f}ms widths:{','.join(map(str, widths))}")
    return hidden, fwd, slot_step


def evaluate_documents(model: GPT, tokens: torch.Tensor, tables: ByteTables, run: Run, geo: Geometry,
                       adapt: Adaptation, want_nll: bool) -> EvalResult:
    """The document mode: every document scored alone (context only from itself), its targets in chunks of
    geo.stride. Documents are grouped in stream order (document_groups); within a group each rank scores the
    documents a static longest-first balance gives it, in batches of rows, in rounds with agreed settings; after a
    group, a phase (phase_train) trains all weights on everything scored so far. Every score precedes every update
    that sees its target: a chunk before its LoRA step, a group before its phase."""
    t0 = time.perf_counter()
    spans = document_spans(tokens)
    lengths = spans[:, 1] - spans[:, 0]
    ranks, world = run.eval_shares()
    lora, slot, phases = adapt.lora, adapt.slot, adapt.phases
    model.requires_grad_(False)     # the adapters learn, the weights only in a phase
    # each rank share has its own adapters (a simulated rank must not carry another's A)
    adapters = {r: Adapters(model, lora, lora.batch) for r in ranks} if lora is not None else {}
    rows = lora.batch if lora is not None else geo.batch_windows
    widths = sorted({doc_width(min(n, (c + 1) * geo.stride), geo) for n in set(lengths.tolist())
                     for c in range(-(-n // geo.stride))})
    groups = document_groups(len(spans), phases)
    # the phases' one forward shape: enough rows for any rank's share of any step, at most PHASE_ROWS
    steps = [s for g0, g1 in groups[:-1] for s in phase_steps(tokens, phase_documents(spans, g0, g1), phases,
                                                               geo.seq_len)] if phases else []
    phase_rows_count = min(PHASE_ROWS, max([-(-len(s) // world) for s in steps], default=1))
    hidden, fwd, slot_step = document_warmup(model, adapters.get(ranks[0]), geo, adapt, run, widths,
                                             phase_rows_count)
    plan = [[g0 + a for a in assign_documents(lengths[g0:g1], world, geo)] for g0, g1 in groups]
    units = {r: sum(rows * doc_width(min(int(lengths[b[0]]), (c + 1) * geo.stride), geo)
                    for g in plan for b in [g[r][i:i + rows] for i in range(0, len(g[r]), rows)]
                    for c in range(-(-int(lengths[b[0]]) // geo.stride)))
             for r in ranks}
    loads = [sum(doc_cost(int(lengths[i]), geo) for g in plan for i in g[r]) for r in range(world)]
    log(f"eval_documents docs:{len(spans)} groups:{len(groups)} rows:{rows} lora:{int(lora is not None)} "
        f"slot:{int(slot is not None)} balance max/mean:{max(loads) / max(1e-9, sum(loads) / world):.3f}")
    states = {}
    for r in ranks:
        budget = EvalBudget(adapt.deadline, slot.steps if slot else 0, int(lora is not None), units[r], units[r],
                            "document")
        ad = adapters.get(r)
        step = slot_step if r == ranks[0] else slot_step_fn(model, ad, run) if slot else None
        states[r] = RankEval(budget, hidden, want_nll, adapters=ad,
                             second=[torch.zeros_like(p) for p in ad.parameters()] if ad is not None else [],
                             slot_step=step, slot_rows=rows)
    base = {n: p.detach().clone() for n, p in model.named_parameters()} if phases else None
    phase_s = 0.0
    for gi, ((g0, g1), assigned) in enumerate(zip(groups, plan)):
        batches = {r: [assigned[r][i:i + rows] for i in range(0, len(assigned[r]), rows)] for r in range(world)}
        for k in range(max(len(b) for b in batches.values())):
            agree_plan(states, run, f"group {gi} batch {k}")
            for r in ranks:
                if k < len(batches[r]):
                    score_document_batch(model, tokens, spans[batches[r][k]], tables, run, geo, adapt, states[r])
        if phases is not None and gi < len(groups) - 1:
            run.barrier()     # every rank has scored the whole group: only now may the weights learn from it
            seconds = phase_train(model, fwd, tokens, phase_documents(spans, g0, g1), phases, geo, run,
                                  phase_rows_count)
            phase_s += seconds
            log(f"eval_phase group:{gi} docs:{g1 - g0} time:{1000 * seconds:.0f}ms")
            for ad in adapters.values():
                ad.restart(keep_a=False)
    if base is not None:
        restore_weights(model, base)
    model.requires_grad_(True)
    return dataclasses.replace(gather_result(states, ranks, run, slot, [], t0), ttt_seconds=phase_s)


@torch.no_grad()
def restore_weights(model: GPT, base: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        p.copy_(base[n])


def gather_result(states: dict, ranks: list[int], run: Run, slot, epochs_run: list[int], t0: float) -> EvalResult:
    """Sum the (simulated) ranks' shares, all-reduce them, and put the per-target NLL back in stream order. The
    rounds' agreed settings must be the same sequence on every rank: checked here, on every run."""
    shards = [states[r] for r in ranks]
    plans = [np.asarray(s.plans, dtype=np.int64).reshape(-1, 2) for s in shards]
    mine = [float(len(p)) + float(sum((i + 1) * (1000 * a + b) for i, (a, b) in enumerate(p.tolist()))) for p in plans]
    span = run.all_reduce(torch.tensor([max(mine), -min(mine)], dtype=torch.float64, device=run.device),
                          dist.ReduceOp.MAX)
    need(float(span[0] + span[1]) == 0, "eval: the ranks scored with different agreed SLOT steps / TTT epochs "
         "(a bug: agree_plan must run at the same points on every rank)")
    sums = [sum(getattr(s, k) for s in shards) for k in ("nll_sum", "tokens", "bytes", "slot_step_sum", "windows")]
    totals = run.all_reduce(torch.tensor(sums, dtype=torch.float64, device=run.device))
    steps_min = run.all_reduce(torch.tensor([min(s.slot_steps_min for s in shards)], device=run.device),
                               dist.ReduceOp.MIN)
    nll_sum, n_tok, n_bytes, step_sum, n_windows = totals.tolist()
    cuts = shards[0].budget.cuts      # agreed cuts: the same count on every rank (checked with the plans above)
    need(n_bytes > 0, f"the {int(n_tok)} scored targets hold no text bytes (VAL_TOKENS too small?)")
    nll_all = None
    if shards[0].want_nll:
        local = [(torch.cat(s.pos).numpy(), torch.cat(s.nll).numpy()) for s in shards if s.nll]
        if run.distributed:
            gathered = [None] * run.world_size
            dist.all_gather_object(gathered, local)
            local = [pair for part in gathered for pair in part]
        pos = np.concatenate([p for p, _ in local]) if local else np.zeros(0, dtype=np.int64)
        nll_all = np.concatenate([v for _, v in local])[np.argsort(pos, kind="stable")] if local else np.zeros(0)
    run.sync()
    return EvalResult(loss=nll_sum / n_tok, bpb=nll_sum / math.log(2) / n_bytes, tokens=int(n_tok), bytes=int(n_bytes),
                      seconds=time.perf_counter() - t0, nll=nll_all, slot_steps_mean=step_sum / max(n_windows, 1),
                      slot_steps_min=int(steps_min.item()) if slot else 0,
                      ttt_epochs_mean=float(np.mean(epochs_run)) if epochs_run else 0.0,
                      ttt_chunks_trained=sum(e > 0 for e in epochs_run),
                      budget_cuts=int(cuts))


def prequant_eval(cfg: Config, run: Run, model: GPT) -> None:
    """EVAL_PREQUANT=1: score the EMA weights before quantization like the final evaluation, SLOT off, so that the
    log shows what quantization costs (final - prequant)."""
    tables = load_byte_tables(cfg.tokenizer_path, cfg.vocab_size)
    r = evaluate(model, load_val_tokens(cfg), tables, run, Geometry.from_config(cfg))
    log(f"prequant_exact val_loss:{r.loss:.8f} val_bpb:{r.bpb:.8f} eval_time:{1000 * r.seconds:.0f}ms "
        f"scored_tokens:{r.tokens}")


def score_name(adapt: Adaptation) -> str:
    """final_<name>_exact: which evaluation made the score (the packager's SCORE_LINES, most adapted first)."""
    if adapt.mode == "document":
        return "document" + "_lora" * bool(adapt.lora) + "_slot" * bool(adapt.slot)
    return {(0, 0): "sliding_window", (1, 0): "slot", (0, 1): "ttt", (1, 1): "slot_ttt"}[(bool(adapt.slot),
                                                                                          bool(adapt.ttt))]


def log_score(name: str, r: EvalResult, adapt: Adaptation = Adaptation()) -> None:
    """The final_<name>_exact line; the run's score is the first of package_record.SCORE_LINES its log holds."""
    extra = f" slot_steps_mean:{r.slot_steps_mean:.2f} slot_steps_min:{r.slot_steps_min}" if adapt.slot else ""
    if adapt.ttt:
        extra += f" ttt_epochs_mean:{r.ttt_epochs_mean:.2f} ttt_chunks_trained:{r.ttt_chunks_trained}"
    extra += f" phase_time:{1000 * r.ttt_seconds:.0f}ms" if adapt.phases else ""
    extra += f" budget_cuts:{r.budget_cuts}" if adapt.slot or adapt.ttt or adapt.lora else ""
    log(f"final_{name}_exact val_loss:{r.loss:.8f} val_bpb:{r.bpb:.8f} eval_time:{1000 * r.seconds:.0f}ms "
        f"scored_tokens:{r.tokens} scored_bytes:{r.bytes}{extra}")


def eval_phase(cfg: Config, run: Run, explicit: set[str], path: Path, t0: float) -> None:
    """Rebuild the model from the artifact on disk and score the whole validation stream. t0 starts the eval budget:
    the process start for PHASES=eval (imports and process-group setup count), else the start of this phase."""
    model_cfg, state = read_artifact(path)
    clash = [f"{k.upper()}={getattr(cfg, k)} (artifact: {v})" for k, v in model_cfg.items()
             if k in explicit and getattr(cfg, k) != v]
    if clash:
        raise RunError(f"settings disagree with the artifact's model: {', '.join(clash)}")
    # the data and tokenizer follow the artifact's VOCAB_SIZE unless they were given
    cfg = dataclasses.replace(cfg, **model_cfg, **{k: "" for k in ("data_path", "tokenizer_path") if k not in explicit})
    cfg.validate_model()
    tables = eval_byte_tables(cfg)
    model = build_model(cfg, run)
    model.load_state_dict(state, strict=True)
    model.eval()
    log(f"artifact_model params:{sum(p.numel() for p in model.parameters())} passes:{len(model.schedule)} "
        f"attention:{model.blocks[0].attn.backend} "
        + " ".join(f"{k}:{','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in model_cfg.items()))
    log(f"eval_data data_path:{cfg.data_path} tokenizer_path:{cfg.tokenizer_path}")
    tokens = load_val_tokens(cfg)
    if run.compiled:   # a fresh model: compile its graphs anew, rather than as recompiles of the training model's
        torch._dynamo.reset()
    log(f"eval_tokens:{len(tokens)} eval_mode:{cfg.eval_mode} eval_seq_len:{cfg.eval_seq_len} "
        f"eval_stride:{cfg.eval_stride} eval_batch_windows:{cfg.eval_batch_windows} "
        f"eval_budget:{cfg.eval_budget_seconds:.0f}s")
    deadline = t0 + cfg.eval_budget_seconds if cfg.eval_budget_seconds > 0 else None   # 0: no deadline (CPU studies)
    adapt = Adaptation.from_config(cfg, deadline)
    slot, ttt, lora, phases = adapt.slot, adapt.ttt, adapt.lora, adapt.phases
    geometry = (tokens, tables, run, Geometry.from_config(cfg))
    if cfg.eval_compare_plain and (slot or ttt or adapt.mode == "document"):
        r = evaluate(model, *geometry)
        log_score("sliding_window", r)
        if deadline is not None:
            adapt = dataclasses.replace(adapt, deadline=deadline + r.seconds)
            log(f"eval_compare_plain: the diagnostic pass took {r.seconds:.1f}s and does not count against "
                f"EVAL_BUDGET_SECONDS (the deadline moves by as much; eval_done counts it, so a record run leaves it "
                f"off)")
    if slot:
        log(f"slot_settings steps:{slot.steps} lr:{slot.lr} lr_min:{slot.lr_min} focal:{slot.focal} "
            f"bias:{int(slot.bias)} warm_start:{slot.warm_start}")
    if ttt:
        log(f"ttt_settings epochs:{ttt.epochs} chunk_tokens:{ttt.chunk_tokens} lr:{ttt.lr} momentum:{ttt.momentum} "
            f"clip:{ttt.clip} reset:{ttt.reset}")
    for name, part in (("lora", lora), ("phase", phases)):
        if part:
            log(f"{name}_settings " + " ".join(f"{k}:{v}" for k, v in dataclasses.asdict(part).items()))
    r = evaluate(model, *geometry, adapt, want_nll=bool(cfg.nll_dump_path))
    log_score(score_name(adapt), r, adapt)
    if r.budget_cuts:
        log(f"eval_budget: WARNING the budget guard cut SLOT steps or TTT epochs {r.budget_cuts} time(s): this score "
            f"is not the configured one (slot_steps_mean:{r.slot_steps_mean:.2f} of {slot.steps if slot else 0}, "
            f"ttt_epochs_mean:{r.ttt_epochs_mean:.2f} of {ttt.epochs if ttt else 0})")
    if cfg.nll_dump_path and run.is_main:
        buf = io.BytesIO()
        np.save(buf, r.nll.astype(np.float64))
        write_atomic(Path(cfg.nll_dump_path), buf.getvalue())
        log(f"nll_dump:{cfg.nll_dump_path} values:{len(r.nll)}")
    log(f"eval_done eval_time:{1000 * (time.perf_counter() - t0):.0f}ms")


# ==================================================================================================
# Process plumbing: run context, failures on any rank, log, timers, atomic files
# ==================================================================================================

@dataclass
class Run:
    """Where this process runs. Kept apart from Config: the same config runs on 1 or 8 ranks."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    compiled: bool = False                 # COMPILE, resolved for this device
    amp: torch.dtype | None = None         # AUTOCAST, resolved for this device: the compute dtype, None = off
    sent: dict[str, int] = dataclasses.field(default_factory=dict)   # bytes sent per collective kind (count())
    watch: FailureWatch | None = None      # the stall watchdog, on several ranks

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            with self.waiting("barrier"):
                dist.barrier()

    def all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            self.count("all_reduce", t)
            with self.waiting("all_reduce"):
                dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def start_all_reduce(self, t: torch.Tensor):
        """Sum t over the ranks in place, asynchronously: pass the handle to wait()."""
        if not self.distributed:
            return None
        self.count("all_reduce", t)
        return dist.all_reduce(t, async_op=True)

    def start_reduce_scatter(self, shard: torch.Tensor, full: torch.Tensor):
        """shard <- this rank's 1/world of the rank-sum of full (split along dim 0), asynchronously."""
        return self._start_sharded("reduce_scatter", dist.reduce_scatter_tensor, shard, full, full)

    def start_all_gather(self, full: torch.Tensor, shard: torch.Tensor):
        """full <- every rank's shard, stacked along dim 0 in rank order, asynchronously."""
        return self._start_sharded("all_gather", dist.all_gather_into_tensor, full, shard, full)

    def _start_sharded(self, kind: str, collective, out: torch.Tensor, inp: torch.Tensor, counted: torch.Tensor):
        if not self.distributed:   # one rank: the shard is the whole
            if out is not inp:
                out.copy_(inp)
            return None
        self.count(kind, counted)
        return collective(out, inp, async_op=True)

    def wait(self, work, what: str) -> None:
        if work is not None:
            with self.waiting(what):
                work.wait()

    def count(self, kind: str, t: torch.Tensor) -> None:
        """Bytes this rank sends for a collective on t, as a ring algorithm moves them (NCCL's large-message case):
        an all-reduce sends 2 (w-1)/w of the tensor, a reduce-scatter or an all-gather (w-1)/w of the full tensor."""
        w = self.world_size
        hops = 2 if kind.endswith("all_reduce") else 1
        self.sent[kind] = self.sent.get(kind, 0) + t.numel() * t.element_size() * (w - 1) * hops // w

    @contextlib.contextmanager
    def waiting(self, what: str):
        """Mark this rank as waiting in a collective, for the stall watchdog (FailureWatch)."""
        if self.watch is None:
            yield
            return
        self.watch.enter(what)
        try:
            yield
        finally:
            self.watch.leave(what)

    def broadcast_object(self, box: list) -> list:
        if self.distributed:
            with self.waiting("broadcast"):
                dist.broadcast_object_list(box, src=0)
        return box

    def main_only(self, fn):
        """Run fn on rank 0 alone and hand its outcome to every rank: its result, or its error raised everywhere, so no
        rank waits in a collective for a rank that has failed."""
        box = [None, None]
        if self.is_main:
            try:
                box[0] = fn()
            except Exception as e:   # every failure is shared, then re-raised here with its traceback
                box[1] = str(e) if isinstance(e, RunError) else f"{type(e).__name__} on rank 0: {e}"
                self.broadcast_object(box)
                raise
        self.broadcast_object(box)
        if box[1] is not None:
            raise RunError(box[1])
        return box[0]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()

    def compile(self, fn, fullgraph: bool = False):
        """fn compiled for fixed shapes (COMPILE), else fn itself."""
        return torch.compile(fn, dynamic=False, fullgraph=fullgraph) if self.compiled else fn

    def eval_shares(self) -> tuple[list[int], int]:
        """(the rank shares this process scores and trains on, the number of shares): its own, of world_size."""
        return [self.rank], self.world_size

    def agree(self, flag: bool) -> bool:
        """True on every rank when it is True on any rank: a decision that changes which collectives a rank issues."""
        return bool(self.all_reduce(torch.tensor([float(flag)], device=self.device), dist.ReduceOp.MAX).item())


def start_run(env: typing.Mapping[str, str], cfg: Config | None = None) -> Run:
    """Read torchrun's variables, pick the device, resolve COMPILE and AUTOCAST for it and open the process group
    (nccl on GPUs, gloo on CPU)."""
    world = int(env.get("WORLD_SIZE", "1"))
    if REFERENCE_GPUS % world != 0:
        raise RunError(f"WORLD_SIZE={world} must divide {REFERENCE_GPUS} (the batch is split into {REFERENCE_GPUS} "
                       "micro-batches)")
    run = Run(rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        run.device = torch.device("cuda", run.local_rank)
        torch.cuda.set_device(run.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = cfg or Config()
    on_cpu = int(run.device.type != "cuda")
    run.compiled = DEVICE_CHOICES["compile"][cfg.compile][on_cpu]
    run.amp = DEVICE_CHOICES["autocast"][cfg.autocast][on_cpu]
    if run.distributed and not dist.is_initialized():
        # 30 min: ranks 1..7 wait in a barrier while rank 0 quantizes and compresses (minutes with size fitting)
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=run.device if run.device.type == "cuda" else None)
    return run


class Log:
    """Rank-0 log: console and logs/<run_id>.txt, one flushed line at a time, so a crash leaves a complete prefix."""

    def __init__(self) -> None:
        self.file = None
        self.enabled = True
        self.last, self.marked = "", time.monotonic()

    def open(self, log_dir: str, run_id: str, enabled: bool) -> str | None:
        """logs/<run_id>.txt, or <run_id>_2.txt ... when that exists (PHASES=eval reusing a RUN_ID): no log is ever
        appended to or overwritten. Returns the file's stem (None where logging is off)."""
        self.enabled = enabled
        if not enabled:
            return None
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            stem = run_id if n == 1 else f"{run_id}_{n}"
            try:
                self.file = open(Path(log_dir) / f"{stem}.txt", "x", encoding="utf-8")
                return stem
            except FileExistsError:
                continue
        raise RunError(f"too many logs named {run_id}_N.txt in {log_dir}")

    def __call__(self, msg: str, console: bool = True) -> None:
        self.last = msg[:80] if console else self.last   # where this rank got to (every rank, for the watchdog)
        self.mark()
        if not self.enabled:
            return
        if console:
            print(msg, flush=True)
        if self.file is not None:
            self.file.write(msg + "\n")
            self.file.flush()

    def mark(self) -> None:
        """Progress without a line (an eval batch, a pack): the stall watchdog counts from the latest mark."""
        self.marked = time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


log = Log()


class FailureWatch:
    """Any exception on any rank ends every rank within a second, with the reason in rank 0's log. The failing rank
    writes one line into the process group's key-value store; a thread on every rank polls for it, and the other
    ranks, which may be waiting in a collective for the failed one, exit at once (rank 0 logs the line first)
    instead of at the process group's timeout. The same thread is a watchdog for a rank stuck without an exception:
    computing for WATCHDOG_SECONDS without reaching a collective, writing a log line or marking progress (log.mark:
    each eval batch), as in a hung compile or a deadlock, or waiting in a collective for twice that (a peer that
    never arrives), fails the rank with the place it is stuck."""
    KEY, LOGGED = "pgolf/failure", "pgolf/failure_logged"

    def __init__(self, run: Run, stall_s: float = 0.0) -> None:
        self.run, self.store = run, dist.distributed_c10d._get_default_store()
        self.failing, self.done, self.lock = False, threading.Event(), threading.Lock()
        self.stall_s, self.doing = stall_s, ("computing", time.monotonic())   # what this rank does, and since when
        self.thread = threading.Thread(target=self._poll, name="failure-watch", daemon=True)
        self.thread.start()

    def enter(self, collective: str) -> None:
        self.doing = (f"waiting in {collective}", time.monotonic())

    def leave(self, collective: str) -> None:
        self.doing = ("computing", time.monotonic())

    def stalled(self) -> str | None:
        """Why this rank counts as stuck, or None."""
        what, since = self.doing
        if what == "computing":   # a log line or a mark is progress too (rank 0's export, a long evaluation)
            since = max(since, log.marked)
        idle = time.monotonic() - since
        limit = self.stall_s * (1 if what == "computing" else 2)   # a computing rank is the one to name first
        if self.stall_s <= 0 or idle <= limit:
            return None
        return (f"rank {self.run.rank} stalled: {what} for {idle:.0f}s (WATCHDOG_SECONDS={self.stall_s:g}) since "
                f"the log line {log.last!r}")

    def _poll(self) -> None:
        while not self.done.wait(0.2):
            try:
                if not self.store.check([self.KEY]):
                    stuck = self.stalled()
                    if stuck is None:
                        continue
                    first = self.publish(stuck)
                    reason = stuck if first == stuck else f"{stuck} (first failure: {first})"
                else:
                    reason = self.store.get(self.KEY).decode()
                    if not self.claim():   # this rank is failing itself and logs its own reason
                        return
            except Exception:   # the store is gone: the process group is shutting down
                return
            try:
                log(f"error: {reason}")
                if not self.run.is_main:
                    print(f"error (rank {self.run.rank}): ending because {reason}", file=sys.stderr, flush=True)
                self.logged()
            finally:
                self.exit()

    def claim(self) -> bool:
        """One error line per rank: the first of the poll thread and the failing main thread to claim it writes it."""
        with self.lock:
            first, self.failing = not self.failing, True
        return first

    def publish(self, reason: str) -> str:
        """Publish this rank's failure; returns the first one published (another rank's, when this failure may be
        only its consequence), or this one where the store is gone."""
        if not self.claim():     # the poll thread is already ending this process with another rank's reason
            time.sleep(60)
        try:
            return self.store.compare_set(self.KEY, "", reason).decode()
        except Exception:
            return reason

    def logged(self) -> None:
        """Rank 0 says the line is in its log; the others wait a little for that, since torchrun stops every worker
        as soon as one exits, and rank 0 may not have polled yet."""
        try:
            if self.run.is_main:
                self.store.set(self.LOGGED, "1")
            else:
                self.store.wait([self.LOGGED], datetime.timedelta(seconds=5))
        except Exception:   # rank 0 gone or slow: its log may lack the line, but this rank still ends now
            pass

    def exit(self) -> None:
        log.close()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)       # no interpreter teardown: the process group may be stuck in a collective

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


@contextlib.contextmanager
def timed(label: str, run: Run):
    """Log `<label>_time:<ms>ms` for the block, with the device synchronized on both sides."""
    run.sync()
    t0 = time.perf_counter()
    yield
    run.sync()
    log(f"{label}_time:{1000 * (time.perf_counter() - t0):.0f}ms")


class WallClock:
    """Training time against the cap. Pauses (validation during training) are not counted, as in the baseline."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.t0 = time.perf_counter()
        self.paused_s = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 - self.paused_s

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        yield
        self.paused_s += time.perf_counter() - t

    def progress(self, step: int, iterations: int, elapsed_s: float) -> float:
        """Fraction of the expected run done: by steps, or by time when the cap comes first. elapsed_s is the time
        all ranks agreed on, so every rank takes the same learning rate and switches QAT at the same step."""
        by_time = elapsed_s / self.limit_s if self.limit_s > 0 else 0.0
        return min(1.0, max(step / iterations, by_time))


def write_atomic(path: Path, data: bytes, replace: bool = True) -> None:
    """Write to a temporary file beside `path`, fsync, then rename: readers see the old file or the whole new one.
    With replace=False an existing `path` is never touched (a hard link fails where a file already is)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if replace:
        os.replace(tmp, path)
        return
    clash = RunError(f"{path} appeared during the run and is kept; the new file is {tmp}")
    try:
        os.link(tmp, path)
        os.unlink(tmp)
    except FileExistsError:
        raise clash from None
    except OSError:   # a filesystem without hard links: check, then rename
        if path.exists():
            raise clash from None
        os.replace(tmp, path)


def log_header(cfg: Config, run: Run) -> None:
    """The log opens with this file's source (as the baseline's does), then the config and the versions."""
    source = Path(__file__).read_text(encoding="utf-8")
    log(source, console=False)
    log("=" * 100, console=False)
    log(f"run_id:{cfg.run_id}")
    log(f"source_lines:{len(source.splitlines())} source_bytes:{len(source.encode())} "
        "(the artifact limit counts its compressed wrapper: code_bytes)")
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        log(f"config.{f.name}:{','.join(map(str, v)) if isinstance(v, tuple) else v}", console=False)
    name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    gpu = f"{name} x{run.world_size}"
    log(f"python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} device:{gpu}")
    log(f"world_size:{run.world_size} phases:{cfg.phases}")


def check_artifact_path(path: Path, phases: set[str]) -> None:
    """Before any work: the artifact is a file, and an export never replaces one."""
    if path.is_dir():
        raise RunError(f"ARTIFACT_PATH={str(path)!r} is a folder; name the artifact file")
    if "export" in phases and path.exists():
        raise RunError(f"artifact {path} already exists; an exporting run never replaces an artifact "
                       "(remove it or choose another ARTIFACT_PATH)")


# ==================================================================================================
# Main
# ==================================================================================================

def main() -> int:
    started = time.perf_counter()
    try:
        cfg, explicit = config_from_env(os.environ)
        run = start_run(os.environ, cfg)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    watch = run.watch = FailureWatch(run, cfg.watchdog_seconds) if run.distributed else None
    try:
        if not cfg.run_id:   # one timestamp for every rank
            cfg.run_id = run.broadcast_object([time.strftime("%Y%m%d_%H%M%S") + f"_seed{cfg.seed}"])[0]
        phases = cfg.phase_set()
        box = run.broadcast_object([log.open(cfg.log_dir, cfg.run_id, enabled=run.is_main)])
        # an exporting run writes the artifact beside its own log (never over an older run's); PHASES=eval reads
        # logs/<RUN_ID>.pgz, the artifact of the run that first used that RUN_ID
        stem = box[0] if "export" in phases else cfg.run_id
        path = Path(cfg.artifact_path or os.path.join(cfg.log_dir, f"{stem}.pgz"))
        log_header(cfg, run)
        check_artifact_path(path, phases)
        if "export" in phases:
            for ident, _, _ in COMPRESSORS.values():
                check_codec(ident)
        if "train" in phases:
            # check the tokenizer now, not after 600 s of training
            needed = "eval" in phases or cfg.val_loss_every
            tables = eval_byte_tables(cfg) if needed else None
            state, labels, calib, model = train_phase(cfg, run, tables)
            if cfg.eval_prequant:
                prequant_eval(cfg, run, model)
            del model
            export_phase(cfg, run, state, labels, path, calib)
        if "eval" in phases:
            eval_phase(cfg, run, explicit, path, started if phases == {"eval"} else time.perf_counter())
        return 0
    except Exception as e:   # any failure, on any rank, in any phase: one error line, and every rank ends
        reason = str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, RunError):
            traceback.print_exc()
        if watch is not None:
            mine = f"rank {run.rank} failed: {reason}"
            first = watch.publish(mine)
            if first != mine:    # another rank failed first: this failure may only be its consequence
                reason += f" (first failure: {first})"
        log(f"error: {reason}")
        if not run.is_main:
            print(f"error (rank {run.rank}): {reason}", file=sys.stderr, flush=True)
        if watch is not None:
            watch.logged()
            watch.exit()
        return 1
    finally:
        if watch is not None:
            watch.stop()
        log.close()
        if dist.is_initialized():
            # DDP and compiled modules sit in reference cycles that hold the process group: free them before it
            # goes, or gloo can abort a rank at interpreter exit
            gc.collect()
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())

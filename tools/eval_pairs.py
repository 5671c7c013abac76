"""Paired CPU comparison of evaluation modes: one artifact, one slice of whole val documents, several Adaptations.

Every variant scores exactly the same targets (the slice is snapped to document boundaries: it starts at a BOS and
ends with the next document's BOS as its last target), from the artifact's weights reloaded before each variant.
Settings come from train_gpt.py's environment variables (EVAL_SEQ_LEN, SLOT_*, TTT_*, LORA_*, PHASE_*); a variant
overrides some of them. No deadline (EVAL_BUDGET_SECONDS does not apply): every variant runs its configured work.

    OMP_NUM_THREADS=1 EVAL_SEQ_LEN=256 ... python tools/eval_pairs.py --artifact A.pgz --offset 0 --tokens 65536 \
        --out logs/eval_budget/pairs_tune.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402

VARIANTS = {
    "plain_sliding": {"EVAL_MODE": "stream", "SLOT_STEPS": "0", "TTT_EPOCHS": "0"},
    "stream_slot_ttt": {"EVAL_MODE": "stream"},
    "document_plain": {"EVAL_MODE": "document", "LORA_RANK": "0", "PHASE_COUNT": "0", "SLOT_STEPS": "0"},
    "document_slot": {"EVAL_MODE": "document", "LORA_RANK": "0", "PHASE_COUNT": "0"},
    "document_lora": {"EVAL_MODE": "document", "PHASE_COUNT": "0", "SLOT_STEPS": "0"},
    "document_lora_slot": {"EVAL_MODE": "document", "PHASE_COUNT": "0"},
    "document_lora_slot_phases": {"EVAL_MODE": "document"},
}


def whole_documents(tokens: torch.Tensor, offset: int, n: int) -> tuple[int, int]:
    """[a, b): from the first BOS at or after `offset` to the last BOS at or before offset + n, inclusive."""
    bos = (tokens == tg.BOS_ID).nonzero().flatten()
    a = int(bos[bos >= offset][0])
    b = int(bos[bos <= offset + n][-1]) + 1
    if b - a < 2:
        raise tg.RunError(f"no whole document in tokens {offset}..{offset + n}")
    return a, b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", required=True)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    base_env = {k: v for k, v in os.environ.items() if k.isupper()}
    cfg0, _ = tg.config_from_env(base_env)
    model_cfg, state = tg.read_artifact(Path(args.artifact))
    cfg0 = dataclasses.replace(cfg0, **model_cfg)
    run = tg.start_run({}, cfg0)
    tokens = tg.load_val_tokens(dataclasses.replace(cfg0, val_tokens=0))
    tables = tg.eval_byte_tables(cfg0)
    a, b = whole_documents(tokens, args.offset, args.tokens)
    tokens, tables = tokens[a:b], tables.slice(a, b)
    model = tg.build_model(cfg0, run)
    n_params = sum(p.numel() for p in model.parameters())
    out = {"artifact": args.artifact, "slice": [a, b], "tokens": b - a, "docs": len(tg.document_spans(tokens)),
           "params": n_params, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "argv": sys.argv[1:], "env": {k: v for k, v in base_env.items() if k in {f.name.upper() for f in
                                                                                   dataclasses.fields(tg.Config)}},
           "results": {}}
    for name in args.variants.split(","):
        cfg, _ = tg.config_from_env(dict(base_env, **VARIANTS[name]))
        cfg = dataclasses.replace(cfg, **model_cfg)
        model.load_state_dict(state, strict=True)
        model.eval()
        adapt = tg.Adaptation.from_config(cfg, None)
        r = tg.evaluate(model, tokens, tables, run, tg.Geometry.from_config(cfg), adapt)
        out["results"][name] = {"val_bpb": r.bpb, "val_loss": r.loss, "seconds": r.seconds,
                                "adapt_seconds": r.ttt_seconds, "scored_tokens": r.tokens, "bytes": r.bytes,
                                "slot_steps_mean": r.slot_steps_mean, "settings": VARIANTS[name]}
        print(f"{name:<28} val_bpb {r.bpb:.6f}  {r.seconds:7.1f} s  (adapt {r.ttt_seconds:.1f} s)  "
              f"scored {r.tokens}", flush=True)
        tg.write_atomic(Path(args.out), (json.dumps(out, indent=1) + "\n").encode())
    plain = out["results"].get("plain_sliding", {}).get("val_bpb")
    if plain is not None:
        for v in out["results"].values():
            v["delta_vs_plain"] = v["val_bpb"] - plain
    tg.write_atomic(Path(args.out), (json.dumps(out, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())

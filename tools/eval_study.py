r"""What evaluation-time adaptation is worth: plain sliding window, SLOT settings and score-first TTT (alone or with
SLOT) side by side on one artifact and one slice of val, plus, for the record only, the two illegal SLOT variants
that the causality harness (tests/test_slot_legality.py) catches. The study notes and results:
logs/eval_study/README.md.

    ARTIFACT_PATH=logs/run.pgz DATA_PATH=... TOKENIZER_PATH=... EVAL_SEQ_LEN=512 EVAL_STRIDE=64 \
        python tools/eval_study.py --tokens 200000 plain steps=8 steps=8,warm_start=0.9 steps=8,bias=0 \
        ttt:ttt_epochs=3 steps=8,ttt_epochs=3,ttt_lr=0.005 leaky_shared:steps=8 leaky_scored:steps=8

A variant is `plain` (the plain sliding window) or `[kind:]key=value,...` over the fields of train_gpt.Slot (steps,
lr, lr_min, focal, bias, warm_start) and, prefixed ttt_, of train_gpt.Ttt (ttt_epochs, ttt_chunk_tokens, ttt_lr,
ttt_momentum, ttt_clip, ttt_reset). Keys left out take train_gpt.py's current defaults; each JSON row records the
full settings it ran with. kind is `slot` (the default: SLOT, with TTT when a ttt_ key is given), `ttt` (TTT on the
plain window), `leaky_shared` (one delta shared by each batch) or `leaky_scored` (delta optimized on the scored
positions). The model comes from the artifact on disk, as in the real evaluation; the eval geometry from
EVAL_SEQ_LEN / EVAL_STRIDE / EVAL_BATCH_WINDOWS. JSON goes to logs/eval_study/<artifact stem>_<offset>_<tokens>.json
unless --out; a study is never overwritten.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))
import train_gpt as T  # noqa: E402
from study_io import run_tool, save_study  # noqa: E402


def parse_variant(text: str) -> tuple[str, str, T.Slot | None, T.Ttt | None]:
    """(text, kind, SLOT settings or None, TTT settings or None)."""
    if text == "plain":
        return text, "plain", None, None
    kind, _, spec = text.rpartition(":")
    kind = kind or "slot"
    if kind not in ("slot", "ttt", "leaky_shared", "leaky_scored"):
        raise SystemExit(f"error: unknown variant kind {kind!r} in {text!r}")
    fields = {f.name: (T.Slot, f.name, f.type) for f in dataclasses.fields(T.Slot)}
    fields.update({f"ttt_{f.name}": (T.Ttt, f.name, f.type) for f in dataclasses.fields(T.Ttt)})
    values = {T.Slot: {}, T.Ttt: {}}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            guess = f"did you mean {close[0]}? " if close else ""
            raise SystemExit(f"error: {key!r} in {text!r} is not a Slot field or ttt_<Ttt field> ({guess}fields: {', '.join(fields)})")
        cls, name, type_name = fields[key]
        hint = {"int": int, "float": float, "bool": bool, "str": str}[str(type_name)]
        try:
            values[cls][name] = bool(int(value)) if hint is bool else hint(value)
        except ValueError:
            raise SystemExit(f"error: {key}={value!r} in {text!r} is not a valid {hint.__name__}") from None
    if kind == "ttt" and values[T.Slot]:
        raise SystemExit(f"error: {text!r}: a ttt: variant has no SLOT; drop the kind to combine SLOT with TTT")
    ttt = T.Ttt(**values[T.Ttt]) if values[T.Ttt] or kind == "ttt" else None
    if ttt is not None and ttt.epochs == 0:
        raise SystemExit(f"error: {text!r}: set ttt_epochs > 0 (TTT with 0 epochs is the variant without it)")
    return text, kind, (None if kind == "ttt" else T.Slot(**values[T.Slot])), ttt


@contextlib.contextmanager
def leaky(kind: str):
    """Swap in one of the illegal variants kept in the causality harness (never used by train_gpt.py)."""
    if kind in ("plain", "slot", "ttt"):
        yield
        return
    import test_slot_legality as H
    name, fn = {"leaky_shared": ("slot_logits", H.leaky_shared_logits),
                "leaky_scored": ("slot_context_weights", H.leaky_scored_slice_weights)}[kind]
    original = getattr(T, name)
    setattr(T, name, fn)
    try:
        yield
    finally:
        setattr(T, name, original)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="plain | [kind:]key=value,... (see above)")
    ap.add_argument("--tokens", type=int, default=200_000, help="evaluate N val tokens (0 = all; default 200000)")
    ap.add_argument("--offset", type=int, default=0, help="starting at this val token (a held-out slice for checking; default 0)")
    ap.add_argument("--out", default="", help="JSON path (default logs/eval_study/<artifact stem>_<offset>_<tokens>.json)")
    args = ap.parse_args()
    variants = list(map(parse_variant, args.variants))
    if not os.environ.get("ARTIFACT_PATH"):
        raise T.RunError("set ARTIFACT_PATH to the artifact to study (e.g. logs/<RUN_ID>.pgz)")
    cfg, _ = T.config_from_env(os.environ)
    artifact = Path(cfg.artifact_path)
    out = Path(args.out or ROOT / "logs" / "eval_study" / f"{artifact.stem}_{args.offset}_{args.tokens}.json")
    if out.exists():
        raise T.RunError(f"{out} already exists; pass another --out (a study is never overwritten)")
    model_cfg, state = T.read_artifact(artifact)
    cfg = dataclasses.replace(cfg, **model_cfg)
    run = T.start_run({})
    model = T.GPT(cfg).to(run.device)
    model.load_state_dict(state)
    model.eval()
    tables = T.eval_byte_tables(cfg)
    tokens = T.load_val_tokens(cfg)
    if not 0 <= args.offset < len(tokens) - 1:
        raise T.RunError(f"--offset {args.offset} is outside the {len(tokens)} val tokens")
    end = args.offset + args.tokens if args.tokens else len(tokens)
    tokens, tables = tokens[args.offset:end], tables.slice(args.offset, end)
    rows = []
    for text, kind, slot, ttt in variants:
        with leaky(kind):
            r = T.evaluate(model, tokens, tables, run, T.Geometry.from_config(cfg), T.Adaptation(slot=slot, ttt=ttt))
        rows.append(dict(variant=text, kind=kind, legal=not kind.startswith("leaky"), val_loss=r.loss, val_bpb=r.bpb,
                         seconds=r.seconds, tokens=r.tokens, slot=dataclasses.asdict(slot) if slot else None,
                         ttt=dataclasses.asdict(ttt) if ttt else None))
        print(f"{text:45s} val_bpb:{r.bpb:.6f} val_loss:{r.loss:.6f} time:{r.seconds:.1f}s", flush=True)
    plain = next((row["val_bpb"] for row in rows if row["variant"] == "plain"), None)
    print(f"\n{'variant':45s} {'legal':>5s} {'val_bpb':>10s} {'vs plain':>10s} {'seconds':>8s}")
    for row in rows:
        gain = f"{row['val_bpb'] - plain:+.5f}" if plain is not None else "-"
        print(f"{row['variant']:45s} {str(row['legal']):>5s} {row['val_bpb']:10.6f} {gain:>10s} {row['seconds']:8.1f}")
    meta = dict(artifact=str(artifact), offset=args.offset, tokens=len(tokens), eval_seq_len=cfg.eval_seq_len, eval_stride=cfg.eval_stride,
                eval_batch_windows=cfg.eval_batch_windows, device=str(run.device), torch=torch.__version__,
                threads=torch.get_num_threads(), date=time.strftime("%Y-%m-%d"), model=model_cfg,
                command=shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]))
    return save_study(out, meta, rows)


if __name__ == "__main__":
    run_tool(main)

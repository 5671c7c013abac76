r"""Quantizer variants side by side on one trained model: per-matrix output error on held-out calibration
activations, packed bytes, and the bpb of the model read back, against the same model before quantization.

    DATA_PATH=... TOKENIZER_PATH=... NUM_LAYERS=11 MODEL_DIM=128 ... ITERATIONS=300 \
        python tools/quant_study.py --name proxy "quantizer=rtn,int6_clip_k=0" "quantizer=gptq,int6_clip_k=0" \
        "quantizer=rtn" "quantizer=gptq" "quantizer=gptq,int6_clip_k=12.85"

A variant is key=value,... over the fields of train_gpt.QuantSpec (int6_clip_k, embed_clip_k, gptq_damp, embed_bits,
mlp_clip_k, lqer_rank, lqer_top, lqer_group, awq_group, pack_groups), plus
quantizer=gptq|rtn (GPTQ with the calibration Hessians, the default, or round to nearest: the export's reference)
and widen=W (the int6 scales x W, as fit_to_limit widens them). The model is trained once with
train_gpt.train_phase (the settings come from the environment, as for train_gpt.py; its GPTQ calibration gives the
Hessians), then cached with held-out Hessians from the next --held-batches training micro-batches in
logs/quant_study/<name>.pt (--cache; reused when present). For each matrix with a Hessian the error is
||X (W - Q)^T||^2 / ||X W^T||^2 over the held-out inputs X (tr(D H D^T) / tr(W H W^T)), Q as read back from the
payload (LQER and AWQ-lite included); "vs rtn" divides it by round-to-nearest with the same spec. bpb: the plain
sliding window (EVAL_SEQ_LEN / EVAL_STRIDE) on the val slices --val-tokens (0..N) and --held-out (after
--held-out-offset).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt as T  # noqa: E402
from study_io import run_tool, save_study  # noqa: E402


def parse_variant(text: str) -> tuple[T.QuantSpec, float, str]:
    """(QuantSpec, widen, quantizer): `widen=W` multiplies the int6 scales as fit_to_limit does (the size knob);
    quantizer is gptq (with the Hessians) or rtn (without)."""
    hints = {f.name: f.type for f in dataclasses.fields(T.QuantSpec)}
    values, widen, quantizer = {}, 1.0, "gptq"
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key == "widen":
            widen = float(value)
        elif key == "quantizer":
            if value not in ("gptq", "rtn"):
                raise T.RunError(f"quantizer={value!r} in {text!r} must be gptq or rtn")
            quantizer = value
        elif key not in hints:
            raise T.RunError(f"{key!r} in {text!r} is not a QuantSpec field, quantizer or widen ({', '.join(hints)})")
        else:
            values[key] = T.parse_setting(key, value, {"int": int, "float": float, "bool": bool}[str(hints[key])])
    return T.QuantSpec(**values), widen, quantizer


def train_or_load(cfg: T.Config, run: T.Run, path: Path, held_batches: int) -> dict:
    if path.exists():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    state, labels, calib, model = T.train_phase(cfg, run, None)
    grad_accum, local_tokens = T.batch_split(cfg, run)
    loader = T.TrainLoader(cfg, run, local_tokens)
    for _ in range(cfg.iterations * grad_accum + cfg.gptq_calib_batches):   # past what training and calibration read
        loader.next()
    held, _ = T.collect_hessians(model, (loader.next() for _ in range(held_batches)), run)
    cache = dict(state=state, labels=labels, model_cfg={f: getattr(cfg, f) for f in T.MODEL_FIELDS},
                 fit=calib.hessians, held=held, train_seconds=time.perf_counter() - t0, calib=calib.summary)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(cache, path)
    return cache


def matrix_errors(cache: dict, quantized: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative output error of each matrix that has a Hessian, read back from a payload (LQER and AWQ-lite
    included), on the held-out inputs."""
    out = {}
    for name, H in cache["held"].items():
        w, Hd = cache["state"][name].double(), H.double()
        d = w - quantized[name].double()
        out[name] = float(torch.trace(d @ Hd @ d.T) / torch.trace(w @ Hd @ w.T))
    return out


def payload_header(payload: bytes) -> dict:
    return json.loads(payload[4:4 + int.from_bytes(payload[:4], "little")])


def code_bits(payload: bytes, kind: str) -> float | None:
    """Order-0 entropy of the codes of every `kind` (int6 or int8) matrix in a payload, bits per weight: what a
    compressor can get near, and what scales to a full model (its weights of that kind x bits / 8 bytes). None
    without such matrices."""
    header = payload_header(payload)
    blob = payload[4 + int.from_bytes(payload[:4], "little"):]
    total = bits = 0.0
    for e in header["tensors"]:
        if e["role"] == "q" and header["storage"][e["name"]] == kind:
            q = torch.from_numpy(T.unshuffle_bytes(blob[e["offset"]:e["offset"] + e["nbytes"]], e["dtype"], e["shape"]))
            p = torch.bincount(q.flatten().long() + 128, minlength=256).double() / q.numel()
            bits += q.numel() * float(-(p[p > 0] * p[p > 0].log2()).sum())   # each matrix's own code distribution
            total += q.numel()
    return bits / total if total else None


def padded(payload: bytes, pad: int) -> bytes:
    """The same payload with `pad` spaces after its JSON header: only the alignment of the arrays moves."""
    n = int.from_bytes(payload[:4], "little")
    return (n + pad).to_bytes(4, "little") + payload[4:4 + n] + b" " * pad + payload[4 + n:]


def measure(cache: dict, text: str, spec: T.QuantSpec, widen: float, quantizer: str, score_state, pre,
            pads: int = 1) -> dict:
    """One variant: pack (GPTQ with the fitting Hessians, or round to nearest), compress with every compressor (each
    compressor's smallest over `pads` header paddings), read back, and measure the output errors (against round to
    nearest with the same spec), code entropies and bpb."""
    gptq = quantizer == "gptq"
    t0 = time.perf_counter()
    payload = T.pack_state(cache["state"], cache["labels"], cache["model_cfg"], spec, cache["fit"] if gptq else None,
                           widen)
    quant_s = time.perf_counter() - t0
    sizes = T.pack_artifact(payload)[2]
    for pad in range(1, pads):
        more = T.pack_artifact(padded(payload, pad))[2]
        sizes = {k: min(v, more[k]) for k, v in sizes.items()}
    compressor = min(sizes, key=sizes.get)
    quantized = T.unpack_state(payload)[1]
    post = score_state(quantized)
    errs = matrix_errors(cache, quantized)
    rtn = matrix_errors(cache, T.unpack_state(T.pack_state(cache["state"], cache["labels"], cache["model_cfg"], spec,
                                                           None, widen))[1])
    ratios = [errs[n] / rtn[n] for n in errs if rtn[n] > 0]
    notes = payload_header(payload).get("notes", {})
    awq = [[n, *note["fine"]] for n, note in notes.items() if "fine" in note]
    return dict(variant=text, quantizer=quantizer, spec=dataclasses.asdict(spec), widen=widen,
                bytes=sizes[compressor], compressor=compressor, sizes=sizes, pads=pads,
                int6_bits=code_bits(payload, "int6"), int8_bits=code_bits(payload, "int8"),
                median_rel_error=statistics.median(errs.values()),
                mean_rel_error=statistics.mean(errs.values()), median_vs_rtn=statistics.median(ratios),
                lqer_targets=[n for n, note in notes.items() if "lqer_group" in note],
                awq_target=awq[0] if awq else [],
                val_bpb=post, gap=[b - a for a, b in zip(pre, post)], quantize_s=quant_s, errors=errs)


def storage_counts(settings: str) -> dict[str, int]:
    """Weights per storage kind of the model that `settings` ("A=1 B=2" over train_gpt's Config) configures, plus
    its matrix rows (each has one fp16 scale); built on the meta device, so a full-size model costs nothing."""
    cfg, _ = T.config_from_env(dict(item.split("=", 1) for item in settings.split()))
    with torch.device("meta"):
        model = T.GPT(cfg)
    counts = {"int6": 0, "int8": 0, "fp16": 0, "fp32": 0, "rows": 0}
    for name, p in model.named_parameters():
        kind = T.PARAM_TABLE[p.label][3]
        kind = kind if p.dim() == 2 or kind in ("fp16", "fp32") else "fp16"
        counts[kind] += p.numel()
        counts["rows"] += p.size(0) if kind in ("int6", "int8") else 0
    return counts


def projected_bytes(counts: dict[str, int], bits6: float | None, bits8: float | None) -> int:
    """Model bytes of a full configuration at the measured code entropies: codes, one fp16 scale per row, fp16 and
    fp32 tensors, before the compressor (which also shrinks the scales and the tensors; the entropy is its floor)."""
    return int(counts["int6"] * (bits6 or 0) / 8 + counts["int8"] * (bits8 or 0) / 8 + 2 * counts["rows"]
               + 2 * counts["fp16"] + 4 * counts["fp32"])


def score(model: T.GPT, state: dict, cfg: T.Config, slices, val, tables) -> list[float]:
    model.load_state_dict(state)
    return [T.evaluate(model, val[a:a + n], tables.slice(a, a + n), T.Run(), T.Geometry.from_config(cfg)).bpb
            for a, n in slices]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="key=value,... over QuantSpec fields")
    ap.add_argument("--name", required=True, help="study name: <out-dir>/<name>.json")
    ap.add_argument("--out-dir", default=str(ROOT / "logs" / "quant_study"))
    ap.add_argument("--cache", default="",
                    help="the trained model and its Hessians (default <out-dir>/<name>.pt; made when missing)")
    ap.add_argument("--artifact", default="",
                    help="also write the artifact of the configured export (GPTQ and the QuantSpec settings) here, as "
                         "train_gpt.py would: the model for tools/eval_study.py")
    ap.add_argument("--held-batches", type=int, default=16)
    ap.add_argument("--pads", type=int, default=1,
                    help="bytes: each compressor's smallest over this many header paddings (0..N-1 spaces): the "
                         "compressors' sizes move by kilobytes with the arrays' alignment alone")
    ap.add_argument("--project", default=None,
                    help='settings of a full configuration ("VOCAB_SIZE=8192 MLP_MULT=4 ...";'
                         ' "" = the defaults): each variant\'s model bytes projected to it from '
                         "the measured entropies")
    ap.add_argument("--val-tokens", type=int, default=65_536)
    ap.add_argument("--held-out", type=int, default=131_072)
    ap.add_argument("--held-out-offset", type=int, default=262_144)
    args = ap.parse_args(argv)
    specs = [(v, parse_variant(v)) for v in args.variants]
    cfg, _ = T.config_from_env(os.environ)
    out_dir = Path(args.out_dir)
    out = out_dir / f"{args.name}.json"
    if out.exists():
        raise T.RunError(f"{out} already exists; pass another --name (a study is never overwritten)")
    run = T.start_run({})
    cache = train_or_load(cfg, run, Path(args.cache) if args.cache else out_dir / f"{args.name}.pt", args.held_batches)
    cfg = dataclasses.replace(cfg, **cache["model_cfg"])
    tables = T.eval_byte_tables(cfg)
    val = T.load_val_tokens(dataclasses.replace(cfg, val_tokens=0))
    slices = [(0, args.val_tokens)] + ([(args.held_out_offset, args.held_out)] if args.held_out else [])
    if args.artifact:
        spec = T.QuantSpec.from_config(cfg)
        payload = T.pack_state(cache["state"], cache["labels"], cache["model_cfg"], spec, cache["fit"])
        blob, _, _ = T.pack_artifact(payload)
        T.write_atomic(Path(args.artifact), blob, replace=False)
        print(f"artifact: {args.artifact} ({len(blob)} bytes, {spec})", flush=True)
    model = T.GPT(cfg).eval()
    pre = score(model, cache["state"], cfg, slices, val, tables)
    print(f"prequant val_bpb {pre}", flush=True)
    model_cfg = cache["model_cfg"]
    counts = storage_counts(args.project) if args.project is not None else None
    rows = []
    for text, (spec, widen, quantizer) in specs:
        rows.append(measure(cache, text, spec, widen, quantizer, lambda st: score(model, st, cfg, slices, val, tables),
                            pre, args.pads))
        row = rows[-1]
        row["bytes_vs_first"] = row["bytes"] - rows[0]["bytes"]
        if counts:
            row["projected_model_bytes"] = projected_bytes(counts, row["int6_bits"], row["int8_bits"])
        bits8 = f"{row['int8_bits']:.3f}" if row["int8_bits"] is not None else "-"
        print(f"{text:40s} bytes {row['bytes']:9d} ({row['bytes_vs_first']:+d})  int6 bits {row['int6_bits']:.3f}  "
              f"int8 bits {bits8}  median rel err {row['median_rel_error']:.5f}  mean {row['mean_rel_error']:.5f}  "
              f"vs rtn {row['median_vs_rtn']:.3f}  gap " + " ".join(f"{g:+.5f}" for g in row["gap"])
              + " " + " ".join(f"{k} {v}" for k, v in row["sizes"].items())
              + "".join(f"  {t} {row['errors'][t]:.5f}" for t in row["lqer_targets"] + row["awq_target"][:1]
                        if t in row["errors"])
              + (f"  projected {row['projected_model_bytes']:,} B" if counts else ""), flush=True)
    meta = dict(name=args.name, slices=slices, prequant_bpb=pre, model=model_cfg, calib=cache.get("calib"),
                held_batches=args.held_batches, project=args.project, project_counts=counts, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"),
                threads=torch.get_num_threads(), eval_seq_len=cfg.eval_seq_len, eval_stride=cfg.eval_stride)
    return save_study(out, meta, rows)


if __name__ == "__main__":
    run_tool(main)

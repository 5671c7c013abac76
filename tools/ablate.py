r"""Paired ablations on one fixed proxy configuration: the baseline and each variant train with the same seed, the same
data order and the same number of steps, then score the same val slices from their own artifacts.

    DATA_PATH=... TOKENIZER_PATH=... python tools/ablate.py "QK_GAIN_INIT=5" "VE_LAYERS=" "PARALLEL_START=7" \
        "MUON_WD=0.09 ADAM_WD=0.09"

A variant is one argument of space-separated SETTING=value pairs (the names of train_gpt.py's Config), applied on top
of the preset; the baseline is the preset alone (plus --base). Each run is train_gpt.py itself (PHASES=train,export,
its own training loop and export); the scoring reuses its evaluate() on the artifact read back from disk (plain
sliding window, SLOT off) on a tuning slice of val and on a held-out slice further on. One row per variant: mean
train loss over the last three logged steps, val bpb on both slices and the difference to the baseline, ms/step on
this machine, parameters and packed bytes. JSON goes to logs/ablate/<name>.json (never overwritten; --out-dir moves it); each
run's log and artifact to logs/ablate/<name>/.

--seconds S trains every run, the baseline too, for S seconds of wall clock instead of a step count
(MAX_WALLCLOCK_SECONDS=S, warm-down by the clock): the way to compare variants whose steps cost different amounts,
such as recurrence on and off. Runs that share the machine (--jobs 2) share it alike, so the comparison stays fair.
What a CPU-scale difference can and cannot tell about an 8 x H100 run: logs/ablate/README.md. Every row prints its
training tokens per parameter beside the result (an 8 x H100 run sees about 190).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import train_gpt as T  # noqa: E402
from study_io import run_tool, save_study  # noqa: E402
from package_record import PackageError, read_log  # noqa: E402

# The proxy configuration of the ablations (logs/ablate/README.md): the defaults at width 128 (11 layers, 4 heads /
# 2 KV, MLP 3x), seq 256, 8,192 tokens per step, 300 steps, eval 256 / 64; each study's JSON keeps its settings.
PRESETS = {
    "proxy_11x128": {
        "NUM_LAYERS": "11", "MODEL_DIM": "128", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "MLP_MULT": "3",
        "TRAIN_SEQ_LEN": "256", "TRAIN_BATCH_TOKENS": "8192", "ITERATIONS": "300",
        "WARMUP_STEPS": "0", "TRAIN_LOG_EVERY": "25", "MAX_WALLCLOCK_SECONDS": "0", "EVAL_SEQ_LEN": "256",
        "EVAL_STRIDE": "64", "EVAL_BATCH_WINDOWS": "32",
    },
}
# Settings the tool owns: a variant that sets them would stop being a paired comparison. With --val-docs the slices
# are whole documents, so a variant may bring its own tokenization (DATA_PATH, TOKENIZER_PATH, VOCAB_SIZE).
OWNED = {"SEED", "DATA_PATH", "TOKENIZER_PATH", "RUN_ID", "LOG_DIR", "PHASES", "ARTIFACT_PATH", "SLOT_STEPS"}
OWNED_UNLESS_DOCS = {"DATA_PATH", "TOKENIZER_PATH"}
GPU_TOKENS_PER_PARAM = 190   # ~6,500 steps x 786,432 tokens / 27M parameters (8 x H100, 600 s)
LAST_LOGGED = 3        # "final train loss" = the mean of the last three logged training losses


def parse_settings(text: str, where: str, by_docs: bool = False) -> dict[str, str]:
    """'A=1 B=2' -> {'A': '1', 'B': '2'}, each name checked against train_gpt.py's Config (with its did-you-mean)."""
    out = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise T.RunError(f"{where}: {item!r} is not SETTING=value")
        if name in OWNED and not (by_docs and name in OWNED_UNLESS_DOCS):
            raise T.RunError(f"{where}: {name} is set by the tool for every run (the comparison must stay paired)")
        out[name] = value
    known = {f.name.upper() for f in dataclasses.fields(T.Config)}
    for name in out:
        if name not in known:
            T.config_from_env({name: out[name]})       # a near miss names the right setting
            raise T.RunError(f"{where}: {name} is not a setting of train_gpt.py")
    return out


def checked(settings: dict[str, str], where: str) -> dict[str, str]:
    """The merged settings of one run, checked for types and ranges as train_gpt.py would check them."""
    try:
        T.config_from_env(settings)
    except T.RunError as e:
        raise T.RunError(f"{where}: {e}") from None
    return settings


def run_env(settings: dict[str, str], args, run_id: str, log_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")}
    env.update(settings)
    env.update(SEED=str(args.seed), DATA_PATH=args.data_path, TOKENIZER_PATH=args.tokenizer_path)
    env.update(settings)     # a variant's own DATA_PATH / TOKENIZER_PATH (--val-docs only)
    env.update(RUN_ID=run_id, LOG_DIR=str(log_dir), PHASES="train,export", OMP_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1")
    return env


def doc_slice(val, first_doc: int, n_docs: int) -> tuple[int, int]:
    """(offset, tokens) of documents first_doc .. first_doc + n_docs - 1 of a val stream (each starts with BOS)."""
    starts = (val == T.BOS_ID).nonzero().flatten().tolist() + [len(val)]
    if first_doc + n_docs >= len(starts):
        raise T.RunError(f"documents {first_doc}..{first_doc + n_docs - 1} are past the {len(starts) - 1} val documents")
    return starts[first_doc], starts[first_doc + n_docs] - starts[first_doc]


def score(artifact: Path, settings: dict[str, str], args, slices: list[tuple[int, int]]) -> list[float]:
    """Plain sliding-window val bpb of the artifact on each (offset, tokens) slice, with train_gpt.py's own code."""
    import torch
    torch.set_num_threads(args.threads)
    cfg, _ = T.config_from_env(dict(dict(DATA_PATH=args.data_path, TOKENIZER_PATH=args.tokenizer_path), **settings))
    model_cfg, state = T.read_artifact(artifact)
    cfg = dataclasses.replace(cfg, **model_cfg)
    model = T.GPT(cfg)
    model.load_state_dict(state)
    model.eval()
    tables = T.eval_byte_tables(cfg)
    val = T.load_val_tokens(dataclasses.replace(cfg, val_tokens=0))
    out = []
    for offset, n in slices:
        if args.val_docs:        # the slices are documents: each run finds them in its own tokenization
            offset, n = doc_slice(val, offset, n)
        if offset + n > len(val):
            raise T.RunError(f"val slice {offset}..{offset + n} is past the {len(val)} val tokens")
        r = T.evaluate(model, val[offset:offset + n], tables.slice(offset, offset + n), T.Run(), T.Geometry.from_config(cfg))
        out.append(r.bpb)
    return out


def run_variant(name: str, settings: dict[str, str], args, out_dir: Path, slices) -> dict:
    """Train and export with train_gpt.py, then score the artifact: one row of the table."""
    run_id = name
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train_gpt.py")], env=run_env(settings, args, run_id, out_dir),
                       cwd=out_dir, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return dict(variant=name, settings=settings, error=f"train_gpt.py exit {r.returncode}: {tail[0]}")
    try:
        log = read_log(out_dir / f"{run_id}.txt")
        losses = [(int(f["step"].split("/")[0]), float(f["train_loss"])) for n, f in log.lines if n == "step" and "train_loss" in f]
        done, sizes = log.need("train_done"), log.need("code_bytes")
    except (PackageError, KeyError, ValueError) as e:
        return dict(variant=name, settings=settings, error=f"unreadable log: {e}")
    bpb = score(out_dir / f"{run_id}.pgz", settings, args, slices)
    params = int(log.need("model_params")["model_params"])
    batch = int(settings.get("TRAIN_BATCH_TOKENS", T.Config.train_batch_tokens))
    return dict(variant=name, settings=settings, steps=int(done["steps"]),
                tokens_per_param=int(done["steps"]) * batch / params,
                final_train_loss=statistics.fmean(v for _, v in losses[-LAST_LOGGED:]), train_losses=losses,
                ms_per_step=float(done["step_avg"].removesuffix("ms")), train_time_ms=float(done["train_time"].removesuffix("ms")),
                params=params, model_bytes=int(sizes["model_bytes"]),
                val_bpb=bpb[0], val_bpb_held_out=bpb[1] if len(bpb) > 1 else None, wall_s=time.perf_counter() - t0)


def code_version() -> str:
    """The commit the runs used, with '+dirty' when train_gpt.py or this tool differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "train_gpt.py", "tools/ablate.py"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def table(rows: list[dict]) -> str:
    base = rows[0]
    head = f"{'variant':34s} {'train_loss':>10s} {'Δ':>8s} {'val_bpb':>9s} {'Δ':>8s} {'held_out':>9s} {'Δ':>8s} " \
           f"{'ms/step':>8s} {'Δ%':>6s} {'params':>9s} {'tok/param':>9s} {'bytes':>9s}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:34s} ERROR {r['error']}")
            continue
        d = lambda k: f"{r[k] - base[k]:+.4f}" if r is not base and r.get(k) is not None and base.get(k) is not None else "-"
        held = f"{r['val_bpb_held_out']:9.4f}" if r["val_bpb_held_out"] is not None else f"{'-':>9s}"
        ms = f"{100 * (r['ms_per_step'] / base['ms_per_step'] - 1):+6.1f}" if r is not base else f"{'-':>6s}"
        lines.append(f"{r['variant'][:34]:34s} {r['final_train_loss']:10.4f} {d('final_train_loss'):>8s} {r['val_bpb']:9.4f} "
                     f"{d('val_bpb'):>8s} {held} {d('val_bpb_held_out'):>8s} {r['ms_per_step']:8.0f} {ms} "
                     f"{r['params']:9d} {r['tokens_per_param']:9.2f} {r['model_bytes']:9d}")
    lines.append(f"tok/param: training tokens per parameter of each run; a 600 s run on 8 x H100 sees about "
                 f"{GPU_TOKENS_PER_PARAM} (5.1B tokens, 27M parameters). Capacity, regularisation and schedule questions "
                 f"answered here at a few tokens per parameter need the GPU records' confirmation.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", help='each one argument: "SETTING=value [SETTING=value ...]"')
    ap.add_argument("--preset", default="proxy_11x128", choices=sorted(PRESETS), help="the fixed configuration (default proxy_11x128)")
    ap.add_argument("--base", default="", help='settings added to the preset for the baseline and every variant ("A=1 B=2")')
    ap.add_argument("--steps", type=int, default=0, help="override the preset's ITERATIONS (warm-down stays half the run)")
    ap.add_argument("--seconds", type=float, default=0.0, help="every run trains for this many seconds, not a step count")
    ap.add_argument("--val-tokens", type=int, default=65_536, help="tuning slice: val tokens 0..N (default 65536)")
    ap.add_argument("--held-out", type=int, default=131_072, help="held-out slice: N val tokens after a gap (0 = none; default 131072)")
    ap.add_argument("--held-out-offset", type=int, default=262_144, help="first token of the held-out slice (default 262144)")
    ap.add_argument("--val-docs", action="store_true",
                    help="--val-tokens, --held-out and --held-out-offset count documents, not tokens: every run scores "
                         "the same text, so variants may set their own DATA_PATH, TOKENIZER_PATH and VOCAB_SIZE")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--jobs", type=int, default=1, help="variants trained at once (ms/step is only comparable within one --jobs)")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run (default 1: stable CPU timings)")
    ap.add_argument("--name", default="", help="study name: <out-dir>/<name>.json and <out-dir>/<name>/ (default: a timestamp)")
    ap.add_argument("--out-dir", default=str(ROOT / "logs" / "ablate"), help="where studies go (default logs/ablate)")
    ap.add_argument("--data-path", default=os.environ.get("DATA_PATH", T.Config().data_path))
    ap.add_argument("--tokenizer-path", default=os.environ.get("TOKENIZER_PATH", T.Config().tokenizer_path))
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    preset = dict(PRESETS[args.preset], **parse_settings(args.base, "--base", args.val_docs))
    if args.steps:
        preset["ITERATIONS"] = str(args.steps)
    if args.seconds:
        preset.update(MAX_WALLCLOCK_SECONDS=str(args.seconds), ITERATIONS="1000000")
    checked(preset, "the baseline")
    variants = [(v, checked(dict(preset, **parse_settings(v, f"variant {v!r}", args.val_docs)), f"variant {v!r}"))
                for v in args.variants]
    name = args.name or time.strftime("%Y%m%d_%H%M%S")
    out_dir, out_json = Path(args.out_dir).resolve() / name, Path(args.out_dir).resolve() / f"{name}.json"
    if out_json.exists() or out_dir.exists():
        raise T.RunError(f"{out_json} or {out_dir} already exists; pass another --name (a study is never overwritten)")
    for path, what in ((args.data_path, "--data-path"), (args.tokenizer_path, "--tokenizer-path")):
        if not Path(path).exists():
            raise T.RunError(f"{what} {path!r} does not exist (set DATA_PATH / TOKENIZER_PATH)")
    out_dir.mkdir(parents=True)
    slices = [(0, args.val_tokens)] + ([(args.held_out_offset, args.held_out)] if args.held_out else [])
    print(f"ablate: preset {args.preset} + {args.base or '(no --base)'}; {len(variants)} variants; jobs {args.jobs}; "
          f"val slices {slices}", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:   # each run is its own process
        base_future = pool.submit(run_variant, "baseline", preset, args, out_dir, slices)
        futures = [pool.submit(run_variant, f"v{i + 1}", s, args, out_dir, slices) for i, (v, s) in enumerate(variants)]
        base = base_future.result()
        if "error" in base:
            raise T.RunError(f"the baseline failed: {base['error']} (log in {out_dir})")
        rows = [base]
        for (text, _), f in zip(variants, futures):
            row = f.result()
            row["variant"] = text
            rows.append(row)
            print(f"done: {text}" + (f" ERROR {row['error']}" if "error" in row else ""), flush=True)
    text = table(rows)
    print("\n" + text)
    import torch
    meta = dict(preset=args.preset, preset_settings=PRESETS[args.preset], base=args.base, steps=int(preset["ITERATIONS"]),
                seconds=args.seconds, seed=args.seed, val_slices=slices, val_docs=args.val_docs, jobs=args.jobs,
                threads=args.threads,
                data_path=args.data_path, torch=torch.__version__, code=code_version(), date=time.strftime("%Y-%m-%d"), host_cpus=os.cpu_count(),
                command=" ".join([Path(sys.argv[0]).name] + [f'"{a}"' if " " in a else a for a in (argv or sys.argv[1:])]))
    return save_study(out_json, meta, rows)


if __name__ == "__main__":
    run_tool(main)

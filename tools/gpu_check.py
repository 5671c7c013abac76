r"""The GPU check, prepared: one call on one H100/H200 that measures what no CPU can, in under 10 minutes, and writes
one JSON summary (plus every log it made) under --out.

    mkdir -p proxy && cp -r ../shared/data/fineweb_proxy_sp1024 ../shared/data/tokenizers proxy/   # git-ignored
    python tools/gpu_check.py --data proxy/fineweb_proxy_sp1024 --tokenizer proxy/tokenizers/fineweb_1024_bpe.model \
        --out "$OUT"

Steps, each a subprocess with its own time limit; a step that fails or times out is recorded and the next one runs:
  1. probe:  torch, CUDA, the device, and FlashAttention-3's verdict (train_gpt.flash_attention_problem);
  2. bench:  tools/bench.py on the default model, recurrence on and off (train ms/step and MFU, eval throughput
             with SLOT, calibration and export time and bytes);
  3. train:  train_gpt.py with the default configuration for --train-seconds (60 s) under
             TORCH_LOGS=graph_breaks,recompiles, its GPTQ export, and the evaluation of --val-tokens with SLOT and
             TTT; the graph breaks and recompiles in its output are counted;
  4. summary.json: the figures of 1-3, the device, torch and the date.
On a CPU with tiny settings (--set, short limits) it runs the same steps: that is how its test checks it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from package_record import SCORE_LINES  # noqa: E402  (the score of a log: the first of them it has)
PROBE = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import train_gpt as T
cfg, _ = T.config_from_env({})
run = T.start_run({})
out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
       "capability": list(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None}
try:
    import flash_attn_interface
    out["fa3_import"] = getattr(flash_attn_interface, "__file__", "ok")
except Exception as e:
    out["fa3_import"] = f"{type(e).__name__}: {e}"
out["fa3_problem"] = T.flash_attention_problem(cfg, run.device)
print("PROBE " + json.dumps(out))
"""


def step(name: str, cmd: list[str], env: dict, timeout: float, out: Path) -> dict:
    """Run one step; its stdout and stderr go to <out>/<name>.out, its outcome into the summary."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        text, rc = r.stdout + "\n--- stderr ---\n" + r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += "\n--- stderr ---\n" + ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
        rc = "timeout"
    (out / f"{name}.out").write_text(text)
    print(f"gpu_check: {name} rc={rc} in {time.perf_counter() - t0:.0f}s", flush=True)
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "output": f"{name}.out", "tail": text.strip().splitlines()[-3:]}


def key_values(text: str, head: str) -> dict[str, str]:
    """The key:value fields of the last line of a train_gpt.py log that starts with `head`."""
    lines = [line for line in text.splitlines() if line.startswith(head)]
    return dict(tok.split(":", 1) for tok in lines[-1].split() if ":" in tok) if lines else {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shards folder (the proxy data)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True, help="folder for summary.json and every step's output")
    ap.add_argument("--set", default="", help='settings for every step, "A=1 B=2" (the CPU test makes the model tiny)')
    ap.add_argument("--train-seconds", type=float, default=60.0)
    ap.add_argument("--val-tokens", type=int, default=524_288)
    ap.add_argument("--bench-args", default="--steps 10 --warmup 3 --eval-tokens 131072")
    ap.add_argument("--limits", default="45,210,330", help="seconds for probe, bench, train (default 45,210,330: 9.75 min)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    limits = [float(x) for x in args.limits.split(",")]
    base = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH",
                                                         "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH")}
    base.update(dict(item.split("=", 1) for item in args.set.split()))
    base.update(DATA_PATH=str(Path(args.data).resolve()), TOKENIZER_PATH=str(Path(args.tokenizer).resolve()),
                LOG_DIR=str(out.resolve()), PYTHONUNBUFFERED="1")
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "settings": args.set, "train_seconds": args.train_seconds,
               "val_tokens": args.val_tokens, "steps": {}}

    s = step("probe", [sys.executable, "-c", PROBE, str(ROOT)], base, limits[0], out)
    probe = next((json.loads(line[6:]) for line in (out / "probe.out").read_text().splitlines() if line.startswith("PROBE ")), None)
    summary["steps"]["probe"], summary["probe"] = s, probe

    bench_json = out / "bench.json"
    s = step("bench", [sys.executable, "tools/bench.py", *args.bench_args.split(), "--out", str(bench_json)], base, limits[1], out)
    summary["steps"]["bench"] = s
    if bench_json.is_file():
        b = json.loads(bench_json.read_text())
        summary["bench"] = {"train": {k: {f: v.get(f) for f in ("step_ms", "step_ms_8gpu", "mfu", "tflops", "peak_memory_bytes", "attention", "warmup_s")}
                                      for k, v in b.get("train", {}).items()},
                            "eval": {k: {f: v.get(f) for f in ("tokens_per_s", "projected_full_val_s_8gpu", "mfu")} for k, v in b.get("eval", {}).items()},
                            "export": {f: b.get("export", {}).get(f) for f in ("calib_s", "quantize_s", "compress_s", "artifact_bytes", "fits")}}

    env = dict(base, RUN_ID="gpu_check_train", MAX_WALLCLOCK_SECONDS=str(args.train_seconds), VAL_TOKENS=str(args.val_tokens),
               TORCH_LOGS="graph_breaks,recompiles", EVAL_PREQUANT="1")
    s = step("train", [sys.executable, "train_gpt.py"], env, limits[2], out)
    summary["steps"]["train"] = s
    text = (out / "train.out").read_text()
    summary["train"] = {
        "graph_breaks": len(re.findall(r"Graph break", text)), "recompiles": len(re.findall(r"[Rr]ecompiling function", text)),
        "attention": key_values(text, "model_params").get("attention"), "attention_log": [l for l in text.splitlines() if l.startswith("attention:")],
        "train_done": key_values(text, "train_done"), "gptq_calib": key_values(text, "gptq_calib"),
        "export": key_values(text, "code_bytes"), "prequant": key_values(text, "prequant_exact"),
        "final": next(({"line": n, **key_values(text, n)} for n in SCORE_LINES if key_values(text, n)), {}), "eval_done": key_values(text, "eval_done"),
        "peak_memory": key_values(text, "peak_memory_allocated"), "compile_warmup": key_values(text, "compile_warmup_time")}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if all(v["rc"] == 0 for v in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

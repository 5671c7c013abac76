r"""The GPU check, prepared: one call on one lent H100 (or H200) that measures what no CPU can, in under 8 minutes,
and writes a JSON after every step under --out.

    python3 tools/gpu_check.py --wheels .whl --data proxy/fineweb_proxy_sp1024 \
        --tokenizer proxy/tokenizers/fineweb_1024_bpe.model --out "$OUT"

The machine has its own Python 3.12 and torch but no brotli, zstandard or FlashAttention-3 and no network; the
git-ignored folders .whl/ (the brotli and zstandard wheels) and proxy/ (the proxy data and tokenizers) travel with
the checkout. --wheels installs every wheel of the folder into a temporary folder (pip --no-index --no-deps
--target) that is put on PYTHONPATH for every step.

Steps, each a subprocess with its own time limit (stdout and stderr merged, in order, into <out>/steps.log); a step
that fails or runs out of time is recorded and the next one runs:
  1. probe:   torch, CUDA, the device, COMPILE/AUTOCAST as resolved there, FlashAttention-3's verdict
              (train_gpt.flash_attention_problem), and the carried packages (brotli, zstandard, every wheel's modules);
  2. hessian: the default model on the device, train_gpt.collect_hessians under AUTOCAST=bf16 on random batches,
              each Hessian against a float64 reference of the same bf16 inputs (forward pre-hooks on the QLinears,
              and the final-norm output for the head): max relative error and dtype;
  3. bench:   tools/bench.py: compile + warm-up seconds, then train ms/step, MFU and peak memory with the recurrence
              off (before RECUR_START_FRAC) and on, calibration and export time and bytes, eval throughput (sliding,
              SLOT, SLOT + TTT); its JSON is rewritten after each section, so a limit keeps what was measured;
  4. train:   train_gpt.py with the default configuration (recurrence switch, late QAT, SLOT, TTT) for
              --train-seconds under TORCH_LOGS=graph_breaks,recompiles, its GPTQ export, and the evaluation of
              --val-tokens with EVAL_COMPARE_PLAIN=1 (plain sliding window and the scored SLOT + TTT pass); graph
              breaks are counted, and recompiles in the warm-up, inside the training clock (between the lines
              `compile_warmup steps:` and `train_done`) and in the evaluation (after `artifact_model`).

Files under --out (at most 8 come back from the device machine): summary.json (rewritten after every step), one
<step>.json per step ({"step": outcome, "result": figures}; bench.json also holds the bench's whole report) and
steps.log. The train step's log, artifact and the compiler cache live in a temporary work folder.

Budget on one H100 (the device call must end inside 8 minutes with a margin; --budget caps the sum, each step gets
min(its limit, the time left), and a step with under 10 s left is skipped):
  wheels    ~5 s   pip install from .whl/, no network
  probe     30 s   torch import and CUDA start (~10 s)
  hessian   40 s   the 27M-parameter model, 2 x 1 x 2048 tokens in bf16, float64 references (~10 s); few tokens keep
                   float32's summation error (grows with the tokens) far below TF32's rounding (see TOLERANCE)
  bench    150 s   compile_warmup of 3 switch states with an empty compiler cache (the unknown: ~60-90 s), 2 x 6 steps
                   of 786,432 tokens (~1 s each), export (calibration, GPTQ, three codecs; ~25 s), then eval last, the
                   section a limit cuts first (the train step measures the real eval anyway)
  train    210 s   start ~10 s, compile_warmup (the bench's compiled kernels are in the shared cache), 60 s of
                   MAX_WALLCLOCK_SECONDS (GPTQ's 10 s calibration inside), export ~25 s, eval of 262,144 val tokens:
                   compile, plain pass, SLOT + TTT (~60 s)
  ---------------
  limits 430 s, --budget 450 s (7.5 min) with the wheels; tool timeout 540 s.
On a CPU with tiny settings (--set, short limits) it runs the same steps: that is how tests/test_gpu_check.py checks it.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from package_record import SCORE_LINES  # noqa: E402  (the score of a log: the first of them it has; standard library only)

STEPS = ("probe", "hessian", "bench", "train")
LIMITS = {"probe": 30.0, "hessian": 40.0, "bench": 150.0, "train": 210.0}
BENCH_SECTIONS = ("train", "export", "eval")
MIN_STEP_S = 10.0
TORCHRUN_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT"}

PROBE = r"""
import importlib, json, os, platform, sys, torch
sys.path.insert(0, sys.argv[1])
import train_gpt as T
cfg, _ = T.config_from_env(os.environ)
run = T.start_run({}, cfg)
cuda = torch.cuda.is_available()
out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name(0) if cuda else "cpu",
       "capability": list(torch.cuda.get_device_capability(0)) if cuda else None,
       "memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
       "compiled": run.compiled, "amp": str(run.amp).removeprefix("torch.") if run.amp else None,
       "fa3_problem": T.flash_attention_problem(cfg, run.device), "imports": {}}
for name in ["flash_attn_interface", *sys.argv[2:]]:
    try:
        m = importlib.import_module(name)
        out["imports"][name] = {"ok": True, "version": getattr(m, "__version__", None), "file": getattr(m, "__file__", None)}
    except Exception as e:
        out["imports"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
print("RESULT " + json.dumps(out))
"""

HESSIAN = r"""
import json, os, sys, time, torch
sys.path.insert(0, sys.argv[1])
import train_gpt as T
n_batches, n_seqs = int(sys.argv[2]), int(sys.argv[3])
# Max error / max entry, on every matrix. TF32 (on for CUDA matmuls) rounds the float32 inputs (the head's, bigram's
# and value embeddings') to 10 bits of mantissa: emulated on a CPU at the default shape and 2 x 2048 tokens, 2.0e-5
# (head) to 7.7e-5 (value embeddings) with round to nearest, 7.2e-4 truncated; exact float32 3.8e-7 on every
# matrix (estimated for a GPU that sums the 4,096 products in one float32 chain: ~5e-6). A bf16 X^T X: ~4e-3.
TOLERANCE = 1e-5
cfg, _ = T.config_from_env(os.environ)
run = T.start_run({}, cfg)
model = T.build_model(cfg, run).eval()
with torch.no_grad():   # noise on every weight: the zero-initialised projections would make some inputs trivial
    g = torch.Generator(device=run.device).manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, device=run.device) * 0.02)
g = torch.Generator().manual_seed(1)
batches = [(torch.randint(0, cfg.vocab_size, (n_seqs, cfg.train_seq_len), generator=g).to(run.device), None)
           for _ in range(n_batches)]
ref, in_dtype = {}, {}

def add(name, x):   # float64 X^T X of exactly the tensor collect_hessians sees
    x = x.detach().reshape(-1, x.size(-1)).double()
    with torch.autocast(x.device.type, enabled=False):
        ref[name] = ref.get(name, 0) + x.T @ x

def pre_hook(name):
    def hook(module, inputs):
        in_dtype[name] = str(inputs[0].dtype).removeprefix("torch.")
        add(name, inputs[0])
    return hook

hooks = [m.register_forward_pre_hook(pre_hook(f"{n}.weight")) for n, m in model.named_modules() if isinstance(m, T.QLinear)]
hidden = model.hidden
model.hidden = lambda x: (lambda h: (add("tok_emb.weight", T.rms_norm(h.double())), h)[1])(hidden(x))
run.sync()
t0 = time.perf_counter()
with torch.no_grad():
    H, tokens = T.collect_hessians(model, batches, run)
run.sync()
seconds = time.perf_counter() - t0
errs = {}
for name, r in ref.items():
    scale = float(r.abs().max())
    errs[name] = float((H[name].to(r.device).double() - r).abs().max()) / scale if scale else 0.0
body = {n: e for n, e in errs.items() if n != "tok_emb.weight"}
worst = max(body, key=body.get)
print("RESULT " + json.dumps({
    "device": str(run.device), "amp": str(run.amp).removeprefix("torch.") if run.amp else None,
    "batches": n_batches, "tokens": tokens, "collect_s": seconds,
    "input_dtypes": {d: list(in_dtype.values()).count(d) for d in sorted(set(in_dtype.values()))},
    "hessian_dtypes": sorted({str(h.dtype).removeprefix("torch.") for h in H.values()}),
    "matrices": len(body), "max_rel_err": body[worst], "worst": worst, "head_rel_err": errs.get("tok_emb.weight"),
    "tf32": torch.backends.cuda.matmul.allow_tf32, "tolerance": TOLERANCE,
    "ok": all(e < TOLERANCE for e in errs.values()) and {str(h.dtype) for h in H.values()} == {"torch.float32"},
    "detail": {"rel_err": errs, "input_dtype": in_dtype}}))
"""


# ==================================================================================================
# Environment and wheels
# ==================================================================================================

def our_settings() -> set[str]:
    """The environment names train_gpt.py reads or rejects (Config's fields, NOT_OURS), read from its source so
    that this process needs no torch."""
    tree = ast.parse((ROOT / "train_gpt.py").read_text(encoding="utf-8"))
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Config":
            names |= {s.target.id.upper() for s in node.body if isinstance(s, ast.AnnAssign)}
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NOT_OURS" for t in node.targets):
            names |= set(ast.literal_eval(node.value))
    return names


def base_env(settings: str, site: str | None) -> dict[str, str]:
    """This process's environment without any setting of ours (every step starts from the defaults) or torchrun's,
    plus --set, plus the wheels' folder on PYTHONPATH."""
    drop = our_settings() | TORCHRUN_VARS
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(dict(item.split("=", 1) for item in settings.split()))
    if site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def install_wheels(folder: Path, log: Path) -> dict:
    """pip install every wheel of `folder` into a fresh temporary folder, offline. Returns what the summary keeps,
    with "site" (the folder) and "modules" (its importable top-level names) on success."""
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    out = {"folder": str(folder), "wheels": [w.name for w in wheels]}
    if not wheels:
        return {**out, "error": f"no *.whl in {folder}"}
    site = tempfile.mkdtemp(prefix="gpu_check_site_")
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "-q", "--target", site, *map(str, wheels)]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"===== wheels: {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=120).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    out.update(rc=rc, seconds=round(time.perf_counter() - t0, 1), site=site)
    if rc != 0:
        return {**out, "error": f"pip install exited {rc} (steps.log)"}
    skip = (".dist-info", ".data", "__pycache__", "bin")
    out["modules"] = sorted({p.name.split(".")[0] for p in Path(site).iterdir() if not p.name.endswith(skip)})
    return out


# ==================================================================================================
# Steps
# ==================================================================================================

def run_step(name: str, cmd: list[str], env: dict, limit: float, log: Path) -> tuple[dict, str]:
    """Run one step in its own process group (same session: whoever ends this call's session ends it too), stdout
    and stderr merged into steps.log in the order written; at the limit, or when this process is stopped, the whole
    group is killed. Returns (outcome, the step's output)."""
    t0 = time.perf_counter()
    with open(log, "ab") as f:
        shown = " ".join(a if len(a) < 200 else "<script: tools/gpu_check.py>" for a in cmd)
        f.write(f"===== {name} (limit {limit:.0f}s): {shown}\n".encode())
        f.flush()
        start = f.tell()
        p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, process_group=0)
        try:
            rc, timed_out = p.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)   # the step and its compile workers
            rc, timed_out = p.wait(), True
        except BaseException:                  # SIGTERM (see main) or Ctrl-C: no step outlives this process
            os.killpg(p.pid, signal.SIGKILL)
            raise
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    seconds = round(time.perf_counter() - t0, 1)
    print(f"gpu_check: {name} rc={rc}{' TIMED OUT' if timed_out else ''} in {seconds:.0f}s (limit {limit:.0f}s)", flush=True)
    return {"rc": None if timed_out else rc, "timed_out": timed_out, "seconds": seconds, "limit_s": round(limit, 1),
            "tail": [l[:300] for l in text.strip().splitlines()[-5:]]}, text


def result_line(text: str) -> dict | None:
    return next((json.loads(l[7:]) for l in reversed(text.splitlines()) if l.startswith("RESULT ")), None)


def key_values(text: str, head: str) -> dict[str, str]:
    """The key:value fields of the last line of a train_gpt.py log that starts with `head`."""
    lines = [line for line in text.splitlines() if line.startswith(head)]
    return dict(tok.split(":", 1) for tok in lines[-1].split() if ":" in tok) if lines else {}


def between(text: str, after: str | None, before: str | None) -> str | None:
    """The output from the first line starting with `after` (None: the start) up to the first later line starting
    with `before` (None: the end); None when `after` never came."""
    if after is not None:
        m = re.search(rf"^{re.escape(after)}", text, re.M)
        if not m:
            return None
        text = text[m.end():]
    m = re.search(rf"^{re.escape(before)}", text, re.M) if before else None
    return text[:m.start()] if m else text


# What dynamo logs (torch 2.9.1 and 2.13, torch/_dynamo/convert_frame.py) when a function hits its recompile limit and
# from then on runs eagerly, printing no more "Recompiling" lines; torch before 2.6 called the limit cache_size_limit.
RECOMPILE_LIMIT_HIT = r"torch\._dynamo hit config\.(?:accumulated_)?(?:recompile|cache_size)_limit"


def compile_counts(text: str) -> dict:
    """Graph breaks, and TORCH_LOGS recompiles by where they happened: the warm-up, inside the training clock, the
    evaluation (None where the run never reached that part)."""
    count = lambda part: None if part is None else part.count("Recompiling function")
    return {"graph_breaks": len(re.findall(r"Graph break", text)),
            "recompile_limit_hits": len(re.findall(RECOMPILE_LIMIT_HIT, text)),
            "recompiles": {"total": count(text), "warmup": count(between(text, None, "compile_warmup steps:")),
                           "clock": count(between(text, "compile_warmup steps:", "train_done")),
                           "eval": count(between(text, "artifact_model", None))}}


def number(v: str | None, suffix: str = "") -> float | None:
    return None if v is None else float(v.removesuffix(suffix))


def train_summary(text: str) -> dict:
    """The figures of the train step's output (train_gpt.py's log lines)."""
    done, warm = key_values(text, "train_done"), key_values(text, "compile_warmup steps:")
    final = next(({"line": n, **key_values(text, n)} for n in SCORE_LINES if key_values(text, n)), {})
    return {"steps": int(done["steps"]) if "steps" in done else None, "step_avg_ms": number(done.get("step_avg"), "ms"),
            "train_time_ms": number(done.get("train_time"), "ms"),
            "recurrence_on": key_values(text, "recurrence:on"), "late_qat_on": key_values(text, "late_qat:on"),
            "compile_warmup": {"time_ms": number(key_values(text, "compile_warmup_time").get("compile_warmup_time"), "ms"),
                               "steps": warm.get("steps"),
                               "states": next((l.split("states:", 1)[1].split() for l in text.splitlines()
                                               if l.startswith("compile_warmup steps:")), None)},
            "peak_memory_allocated": key_values(text, "peak_memory_allocated").get("peak_memory_allocated"),
            "model": key_values(text, "model_params"), "attention_log": [l for l in text.splitlines() if l.startswith(("attention:", "attention_kernel"))],
            "gptq_calib": key_values(text, "gptq_calib "), "export": key_values(text, "code_bytes"),
            "artifact": key_values(text, "artifact:"), "export_time": key_values(text, "export_time").get("export_time"),
            "prequant": key_values(text, "prequant_exact"), "plain": key_values(text, "final_sliding_window_exact"),
            "final": final, "eval_done": key_values(text, "eval_done"), **compile_counts(text),
            "errors": [l for l in text.splitlines() if l.startswith("error")][-3:]}


def bench_summary(report: dict, text: str) -> dict:
    """The bench's headline figures (the whole report is in bench.json), and the recompiles TORCH_LOGS showed
    between the end of its compile warm-up and the end of its train section: inside the timed steps, where there
    should be none."""
    train = report.get("train", {})
    pick = lambda d, keys: {k: d.get(k) for k in keys}
    timed = between(text, "compile_warmup steps:", "bench_section_done:train")
    return {"complete": report.get("complete"), "sections_done": report.get("sections_done"), "error": report.get("error"),
            "compiled": report.get("compiled"), "amp": report.get("amp"), "graph_breaks": len(re.findall(r"Graph break", text)),
            "recompiles_in_timed_steps": None if timed is None or "bench_section_done:train" not in text
            else timed.count("Recompiling function"),
            "train": {"compile_warmup": train.get("compile_warmup"), "recur_cost_pct": train.get("recur_cost_pct"),
                      **{k: pick(train[k], ("passes", "step_ms", "step_ms_8gpu", "settle_step_ms", "tokens_per_s", "tflops",
                                             "mfu", "peak_memory_bytes", "attention"))
                         for k in ("recur_off", "recur_on") if k in train}},
            "export": pick(report.get("export", {}), ("calib_s", "quantize_s", "compress_s", "compressor", "artifact_bytes",
                                                      "total_submission_bytes", "fits")),
            "eval": {k: pick(v, ("seconds", "warmup_s", "tokens_per_s", "mfu", "projected_full_val_s_8gpu", "ttt_s_per_chunk",
                                 "val_bpb")) for k, v in report.get("eval", {}).items()}}


# ==================================================================================================
# Main
# ==================================================================================================

def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="shards folder (the proxy data)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True, help="folder for summary.json, <step>.json and steps.log")
    ap.add_argument("--wheels", default="", help="folder of wheels to install into a temporary folder on PYTHONPATH")
    ap.add_argument("--set", default="", help='settings for every step, "A=1 B=2" (the CPU test makes the model tiny)')
    ap.add_argument("--steps", default=",".join(STEPS), help=f"steps to run, of {','.join(STEPS)}")
    ap.add_argument("--skip", default="", help="steps to leave out, and bench sections as bench.<section> (bench.eval)")
    ap.add_argument("--train-seconds", type=float, default=60.0, help="the train step's MAX_WALLCLOCK_SECONDS")
    ap.add_argument("--val-tokens", type=int, default=262_144, help="the train step's VAL_TOKENS")
    ap.add_argument("--bench-args", default="--steps 5 --warmup 3 --eval-tokens 131072")
    ap.add_argument("--hessian-batches", default="2x1", help="the hessian step's batches x sequences")
    ap.add_argument("--limits", default="", help="seconds per step, e.g. probe=30,train=200 (defaults: "
                                                 + ",".join(f"{k}={v:.0f}" for k, v in LIMITS.items()) + ")")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for the whole call, wheels included")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (train log, artifact, compiler cache)")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.run = [s for s in (x.strip() for x in args.steps.split(",")) if s and s not in skip]
    args.sections = [s for s in BENCH_SECTIONS if f"bench.{s}" not in skip]
    args.limits = {**LIMITS, **{k: float(v) for k, v in (i.split("=") for i in args.limits.split(",") if i)}}
    bad = (set(args.run) | {s for s in skip if not s.startswith("bench.")}) - set(STEPS)
    bad |= {s for s in skip if s.startswith("bench.") and s[6:] not in BENCH_SECTIONS} | (set(args.limits) - set(STEPS))
    if bad:
        ap.error(f"unknown steps or sections: {sorted(bad)}")
    return args


def step_command(name: str, args, work: Path, modules: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command of a step and the settings it owns (they win over --set)."""
    if name == "probe":
        return [sys.executable, "-c", PROBE, str(ROOT), *modules], {}
    if name == "hessian":
        batches, seqs = args.hessian_batches.split("x")
        return [sys.executable, "-c", HESSIAN, str(ROOT), batches, seqs], {"AUTOCAST": "bf16"}
    if name == "bench":
        return [sys.executable, "tools/bench.py", *args.bench_args.split(), "--sections", ",".join(args.sections),
                "--out", str(work / "bench.json")], {"TORCH_LOGS": "graph_breaks,recompiles"}
    return [sys.executable, "train_gpt.py"], {
        "RUN_ID": "gpu_check_train", "LOG_DIR": str(work), "MAX_WALLCLOCK_SECONDS": str(args.train_seconds),
        "VAL_TOKENS": str(args.val_tokens), "EVAL_COMPARE_PLAIN": "1", "TORCH_LOGS": "graph_breaks,recompiles"}


def step_result(name: str, text: str, work: Path) -> tuple[dict | None, dict]:
    """(the summary's figures of a step, extra fields of its own JSON)."""
    if name in ("probe", "hessian"):
        result = result_line(text)
        return result, {"detail": result.pop("detail", None)} if result else {}
    if name == "bench":
        path = work / "bench.json"
        report = json.loads(path.read_text()) if path.is_file() else {}
        return (bench_summary(report, text) if report else None), {"report": report}
    return train_summary(text), {}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stopped from outside: kill the step, keep the JSONs
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "steps.log"
    work = Path(tempfile.mkdtemp(prefix="gpu_check_work_"))
    summary = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[1:], "python": platform.python_version(),
               "host": platform.node(), "settings": args.set, "train_seconds": args.train_seconds,
               "val_tokens": args.val_tokens, "budget_s": args.budget, "limits": args.limits, "steps_planned": args.run,
               "bench_sections": args.sections, "inductor_cache": "one fresh folder for the call: the first step that "
               "compiles does so from scratch, later steps reuse its kernels", "steps": {}, "complete": False}
    wheels = install_wheels(Path(args.wheels), log) if args.wheels else None
    summary["wheels"] = wheels
    write_json(out / "summary.json", summary)
    env = base_env(args.set, wheels.get("site") if wheels else None)
    env.update(DATA_PATH=str(Path(args.data).resolve()), TOKENIZER_PATH=str(Path(args.tokenizer).resolve()),
               TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"))
    modules = sorted({"brotli", "zstandard", *((wheels or {}).get("modules") or [])})
    try:
        for name in args.run:
            left = args.budget - (time.perf_counter() - t_start)
            if left < MIN_STEP_S:
                summary["steps"][name] = {"rc": None, "skipped": f"{max(left, 0):.0f}s of the budget left"}
            else:
                cmd, own = step_command(name, args, work, modules)
                outcome, text = run_step(name, cmd, dict(env, **own), min(args.limits[name], left), log)
                result, extra = step_result(name, text, work)
                summary["steps"][name], summary[name] = outcome, result
                write_json(out / f"{name}.json", {"step": outcome, "result": result, **extra})
            summary["elapsed_s"] = round(time.perf_counter() - t_start, 1)
            write_json(out / "summary.json", summary)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        if wheels and wheels.get("site"):
            shutil.rmtree(wheels["site"], ignore_errors=True)
    summary["complete"] = True
    write_json(out / "summary.json", summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1))
    print(json.dumps({"bench": summary.get("bench")}))
    return 0 if all(s.get("rc") == 0 for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Package the logs of N seeds of train_gpt.py into a records folder for a Parameter Golf pull request.

    python tools/package_record.py --meta meta.json --description notes.md \\
        --compare-bpb 1.1147,1.1152,1.1139 --compare-name "PR #1234" \\
        logs/seed1337.txt logs/seed42.txt logs/seed2025.txt

writes records/track_10min_16mb/YYYY-MM-DD_<name>/ with train_gpt.py (the code the logs ran, taken from their
source block and compressed mechanically: lzma + base85 in a two-line wrapper that runs it unchanged; --readable-code
ships it as it is), README.md (summary table + your description), submission.json, train_seed<SEED>.log for each log
and requirements.txt. meta.json holds name, author, github_id and blurb (the flags of those names win). The folder is
built in a temporary folder and renamed into place; an existing one is kept unless --force. `--summary-only FILE`
writes only submission.json (the repository's top-level one); with no logs it writes the "no 8 x H100 logs yet"
form, with every score field null. `--compress-code OUT` writes the compressed wrapper of this repository's
train_gpt.py, to launch the seeds with it.

It refuses, naming the file: a log that is incomplete or ended in error, a run over a limit (train 600 s, eval
600 s, 16,000,000 bytes), logs of different code or configuration, a repeated seed, and a run that is not 8 x H100
or did not score every target of the official val set, unless --allow-non-record (the submission is then marked as
not a record). The causality harness (HARNESS_FILES: both eval modes) runs against the logged code unless
--skip-harness; its outcome (passed / failed / skipped / not_available) goes into the compliance block.

Given the current record (--compare-loss or --compare-bpb: per-seed values or mean:M,std:S,n:N), it reports the
improvement in nats and a one-sided Welch t-test of H0: improvement <= 0.005 nats; the record bar is p < 0.01. The
Student-t tail comes from the regularized incomplete beta function implemented here (no scipy).

The log contract. logs/<RUN_ID>.txt, written by rank 0 of train_gpt.py, holds the exact source of train_gpt.py, a
line of 100 "=", then one line per event: space-separated key:value pairs, the first key naming the line. The main
lines, in order:
- header: run_id | source_lines source_bytes | one config.<field>:<value> per setting |
  python torch cuda device:<name> x<N> (the device name may hold spaces: it runs to the end of the line) |
  world_size phases;
- training: model_params ... | step:N/TOTAL train_loss train_time step_avg | recurrence:on and late_qat:on with
  step and train_time, when they switch | stopping_early: wallclock_cap ... | train_done steps train_time step_avg |
  with several ranks, rank_sync: identical weights (or a WARNING with the checksum spread);
- calibration: gptq_calib calib_batches calib_tokens calib_time train_time_with_calib (the training time held
  against 600 s);
- with EVAL_PREQUANT=1: prequant_exact val_loss val_bpb ... (the EMA weights before quantization, no SLOT or TTT);
- export: export_pack widen lzma_bytes brotli_bytes zstd_bytes, one per pack | artifact:<path> quantizer
  calib_batches ... int6_clip_k embed_clip_k int6_scale_widen ... | code_bytes model_bytes total_submission_bytes
  compressor (code_bytes must equal the source block's bytes);
- evaluation: artifact_model params passes ... (PHASES=eval only: the shape read from the artifact) | eval_tokens ... |
  slot_settings ... and ttt_settings ... | eval_budget: WARNING cut ..., one per cut | final_<pass>_exact val_loss
  val_bpb eval_time scored_tokens scored_bytes (with SLOT or TTT also slot_steps_mean slot_steps_min
  ttt_epochs_mean ttt_chunks_trained budget_cuts) | eval_budget: WARNING ..., when anything was cut |
  eval_done eval_time;
- error: <reason>, when the run fails.
Times carry their unit (train_time:1234ms). This file reads the config lines, python (versions and device), train_done,
stopping_early, gptq_calib, code_bytes, the score line, eval_done and error. The score line is the first of
SCORE_LINES that the log holds: the document mode's lines (final_document_lora_slot_exact ...), then final_slot_ttt_exact,
final_ttt_exact, final_slot_exact, final_sliding_window_exact
(EVAL_COMPARE_PLAIN=1 adds a final_sliding_window_exact line before the scored one).
"""
from __future__ import annotations

import argparse
import ast
import base64
import datetime
import json
import lzma
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as tg  # noqa: E402  (the shipped code's wrapper format)

SEPARATOR = "=" * 100                 # train_gpt.py writes it between the source block and the key:value lines
TRACK = "10min_16mb"
RECORDS_DIR = Path("records/track_10min_16mb")
TRAIN_LIMIT_MS = 600_000
EVAL_LIMIT_MS = 600_000
ARTIFACT_LIMIT_BYTES = 16_000_000
RECORD_GPUS, RECORD_GPU = 8, "H100"   # the track is timed on 8 x H100 SXM
OFFICIAL_VAL_TARGETS = 62_021_846 - 1  # every target of the fixed FineWeb val stream (62,021,846 tokens at sp1024)
MIN_IMPROVEMENT_NATS = 0.005          # a new record beats the last by >= 0.005 nats ...
MAX_P_VALUE = 0.01                    # ... with p < 0.01
# The causality harness: the stream mode's and the document mode's (run together, as one command)
HARNESS_FILES = ("tests/test_slot_legality.py", "tests/test_document_legality.py")
HARNESS = " ".join(HARNESS_FILES)
# The submission's score: the first of these lines that a log holds (the plain sliding window comes last: it is also
# the EVAL_COMPARE_PLAIN diagnostic)
SCORE_LINES = ("final_document_lora_slot_exact", "final_document_lora_exact", "final_document_slot_exact",
               "final_document_exact", "final_slot_ttt_exact", "final_ttt_exact", "final_slot_exact",
               "final_sliding_window_exact")
# Config fields allowed to differ between the seeds of one submission.
PER_RUN_FIELDS = {"seed", "run_id", "log_dir", "artifact_path", "nll_dump_path", "data_path", "tokenizer_path"}


class PackageError(Exception):
    """Bad input: one line naming the file or value, exit code 1."""


# ==================================================================================================
# Reading a log
# ==================================================================================================

@dataclass
class RunLog:
    path: Path
    source: str                                 # train_gpt.py as it ran: the block before the separator
    config: dict[str, str]                      # config.<field>:<value>
    lines: list[tuple[str, dict[str, str]]]     # (first token's key, {key: value}) for every other line
    device: str = ""                            # "cpu x1", "NVIDIA H100 80GB HBM3 x8"
    error: str | None = None
    raw: str = field(default="", repr=False)

    def last(self, name: str) -> dict[str, str] | None:
        return next((f for n, f in reversed(self.lines) if n == name), None)

    def need(self, name: str, why: str = "") -> dict[str, str]:
        line = self.last(name)
        if line is None:
            raise PackageError(f"{self.path}: incomplete log: no `{name}` line{why}")
        return line

    def number(self, name: str, key: str) -> float:
        text = self.need(name).get(key)
        if text is None:
            raise PackageError(f"{self.path}: the `{name}` line has no {key}:")
        try:
            return float(re.sub(r"(ms|MiB)$", "", text))
        except ValueError:
            raise PackageError(f"{self.path}: `{name}` {key}:{text} is not a number") from None

    @property
    def seed(self) -> int:
        try:
            return int(self.config["seed"])
        except (KeyError, ValueError):
            raise PackageError(f"{self.path}: no valid config.seed line") from None


def read_log(path: Path) -> RunLog:
    """Split a train_gpt.py log into its source block and its key:value lines."""
    try:
        raw = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise PackageError(f"{path}: no such log file") from None
    except UnicodeDecodeError:
        raise PackageError(f"{path}: not a train_gpt.py log (not UTF-8 text; an artifact?)") from None
    except OSError as e:
        raise PackageError(f"{path}: cannot read: {e}") from None
    sep = "\n" + SEPARATOR + "\n"
    runs = raw.count(sep)
    if runs == 0:
        raise PackageError(f"{path}: not a train_gpt.py log (no line of 100 '=' after the source block)")
    if runs > 1:
        raise PackageError(f"{path}: holds {runs} runs appended to one file (a RUN_ID used twice); "
                           f"package logs of single PHASES=train,export,eval runs")
    source, body = raw.split(sep)
    log = RunLog(path=path, source=source, config={}, lines=[], raw=raw)
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("config."):
            key, _, value = line.removeprefix("config.").partition(":")
            log.config[key] = value
            continue
        if line.startswith("error:"):
            log.error = line.removeprefix("error:").strip()
            continue
        head = line.split(" ", 1)[0].split(":", 1)[0]
        fields = {}
        if "device:" in line and head == "python":   # the GPU name has spaces: device runs to the end of line
            line, _, log.device = line.partition("device:")
            log.device = log.device.strip()
            fields["device"] = log.device
        for tok in line.split():
            k, sep_, v = tok.partition(":")
            if sep_:
                fields[k] = v
        log.lines.append((head, fields))
    return log


def score_line(log: RunLog) -> tuple[str, dict[str, str]]:
    """THE rule for the submission's score: the first of SCORE_LINES the log has (the pass with SLOT and / or TTT,
    else the plain sliding window)."""
    for name in SCORE_LINES:
        line = log.last(name)
        if line is not None:
            return name, line
    raise PackageError(f"{log.path}: incomplete log: no final evaluation line ({' or '.join(SCORE_LINES)})")


# ==================================================================================================
# The shipped code: the readable train_gpt.py, compressed mechanically (its bytes count against the 16 MB)
# ==================================================================================================

# the wrapper's format lives in train_gpt.py, whose export counts its bytes: both sides agree by construction
WRAP_HEAD, WRAP_LINE, wrap_source, unwrap_source = tg.WRAP_HEAD, tg.WRAP_LINE, tg.wrap_source, tg.unwrap_source


def shipped_code(source: str, readable: bool) -> str:
    """What the records folder's train_gpt.py holds: the compressed wrapper of the logged code (the logged code
    itself when it already is one, or with --readable-code)."""
    return source if readable or unwrap_source(source) is not None else wrap_source(source)


def check_complete(log: RunLog) -> None:
    if log.error is not None:
        raise PackageError(f"{log.path}: the run ended in error: {log.error}")
    phases = log.config.get("phases", "")
    if set(phases.split(",")) != {"train", "export", "eval"}:
        raise PackageError(f"{log.path}: PHASES={phases}; a record log must train, export and evaluate in one run")
    log.need("train_done", " (training did not finish)")
    log.need("code_bytes", " (the artifact was not exported)")
    score_line(log)
    log.need("eval_done", " (evaluation did not finish)")
    code_bytes = int(log.number("code_bytes", "code_bytes"))
    shipped = len(shipped_code(log.source, readable=False).encode("utf-8"))
    if shipped != code_bytes:
        raise PackageError(f"{log.path}: the source block ships as {shipped} bytes (its compressed wrapper) but the "
                           f"run counted code_bytes:{code_bytes}; the log was edited, is not byte-exact, or ran another "
                           "version of the wrapper")


def train_time_ms(log: RunLog) -> float:
    """Training as the rules count it: the steps, plus the GPTQ calibration that still reads training data."""
    calib = log.last("gptq_calib")
    if calib is not None and "train_time_with_calib" in calib:
        return log.number("gptq_calib", "train_time_with_calib")
    return log.number("train_done", "train_time")


def check_limits(log: RunLog) -> None:
    train_ms = train_time_ms(log)
    eval_ms = log.number("eval_done", "eval_time")
    total = log.number("code_bytes", "total_submission_bytes")
    if train_ms > TRAIN_LIMIT_MS:
        raise PackageError(f"{log.path}: train_time {train_ms:.0f} ms exceeds the {TRAIN_LIMIT_MS:,} ms limit")
    if eval_ms > EVAL_LIMIT_MS:
        raise PackageError(f"{log.path}: eval_time {eval_ms:.0f} ms exceeds the {EVAL_LIMIT_MS:,} ms limit")
    if total > ARTIFACT_LIMIT_BYTES:
        raise PackageError(f"{log.path}: total_submission_bytes {total:.0f} exceeds the {ARTIFACT_LIMIT_BYTES:,}-byte limit")


def hardware(log: RunLog) -> tuple[str, int]:
    """(device name, count) from `device:<name> x<N>`."""
    m = re.fullmatch(r"(.+) x(\d+)", log.device)
    if not m:
        raise PackageError(f"{log.path}: no `device:<name> x<count>` on the python: line")
    return m.group(1), int(m.group(2))


def not_record_reasons(log: RunLog) -> list[str]:
    """Why this run cannot be a record (empty when it can): the hardware, or a partial validation set."""
    name, count = hardware(log)
    reasons = []
    if name == "cpu":
        reasons.append(f"ran on a CPU ({log.device})")
    elif count < RECORD_GPUS:
        reasons.append(f"ran on {count} GPU(s) ({log.device}); a record run uses {RECORD_GPUS}")
    elif RECORD_GPU not in name or count != RECORD_GPUS:
        reasons.append(f"ran on {log.device}; the track is timed on {RECORD_GPUS} x {RECORD_GPU}")
    if log.config.get("val_tokens", "0") != "0":
        reasons.append(f"scored only the first VAL_TOKENS={log.config['val_tokens']} validation tokens")
    scored = int(log.number(score_line(log)[0], "scored_tokens"))
    if scored != OFFICIAL_VAL_TARGETS:
        reasons.append(f"scored {scored:,} targets, not the {OFFICIAL_VAL_TARGETS:,} of the official validation set")
    return reasons


def check_same_run(logs: list[RunLog]) -> None:
    """Seeds of one submission: the same code, configuration (but seed and paths) and hardware; distinct seeds."""
    first = logs[0]
    for log in logs[1:]:
        if log.source != first.source:
            a, b = first.source.splitlines(), log.source.splitlines()
            line = next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)) + 1)
            raise PackageError(f"{log.path} ran different code than {first.path} (train_gpt.py differs at line {line})")
        for key in sorted((set(first.config) | set(log.config)) - PER_RUN_FIELDS):
            if first.config.get(key) != log.config.get(key):
                raise PackageError(f"logs disagree on configuration: {key} is {first.config.get(key)!r} in {first.path} "
                                   f"but {log.config.get(key)!r} in {log.path}")
        if log.device != first.device:
            raise PackageError(f"logs disagree on hardware: {first.device!r} in {first.path} but {log.device!r} in {log.path}")
        if score_line(log)[0] != score_line(first)[0]:   # a mean over two different evaluations means nothing
            raise PackageError(f"logs disagree on the score: {score_line(first)[0]} in {first.path} but "
                               f"{score_line(log)[0]} in {log.path}")
    seen: dict[int, Path] = {}
    for log in logs:
        if log.seed in seen:
            raise PackageError(f"seed {log.seed} appears twice: {seen[log.seed]} and {log.path}")
        seen[log.seed] = log.path


# ==================================================================================================
# Results
# ==================================================================================================

def seed_result(log: RunLog) -> dict:
    name, score = score_line(log)
    return {
        "seed": log.seed,
        "run_id": log.config.get("run_id"),
        "val_loss": float(score["val_loss"]),
        "val_bpb": float(score["val_bpb"]),
        "score_line": name,
        "bytes_total": int(log.number("code_bytes", "total_submission_bytes")),
        "bytes_model": int(log.number("code_bytes", "model_bytes")),
        "bytes_code": int(log.number("code_bytes", "code_bytes")),
        "steps": int(log.number("train_done", "steps")),
        "step_avg_ms": log.number("train_done", "step_avg"),
        "train_time_s": train_time_ms(log) / 1000,
        "eval_time_s": log.number("eval_done", "eval_time") / 1000,
        "score_eval_time_s": log.number(name, "eval_time") / 1000,
        "scored_tokens": int(log.number(name, "scored_tokens")),
        "scored_bytes": int(log.number(name, "scored_bytes")),
        "stopped_early": log.last("stopping_early") is not None,
        "log": f"train_seed{log.seed}.log",
    }


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); the std is None for a single seed."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def config_defaults(source: str) -> dict[str, str]:
    """Literal defaults of `class Config` in the logged source, formatted as the log formats values."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return {}
    cls = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config"), None)
    out = {}
    for node in cls.body if cls else []:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            try:
                v = ast.literal_eval(node.value)
            except ValueError:
                continue
            out[node.target.id] = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return out


def env_overrides(log: RunLog) -> dict[str, str]:
    """Settings the runs changed from the script's defaults: they belong in the reproduction command."""
    defaults = config_defaults(log.source)
    return {k.upper(): v for k, v in log.config.items()
            if k not in PER_RUN_FIELDS and k in defaults and defaults[k] != v}


# ==================================================================================================
# Welch's t-test (one-sided), with the Student-t tail from the regularized incomplete beta function
# ==================================================================================================

def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),              # even step d_{2m}
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step d_{2m+1}
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
        if abs(c * d - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) = B(x; a, b) / B(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b   # I_x(a,b) = 1 - I_{1-x}(b,a)


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional, as Welch's is)."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + t * t))   # P(|T| > |t|) / 2
    return tail if t > 0 else 1.0 - tail


def welch_test(ours: list[float], theirs_mean: float, theirs_std: float, theirs_n: int, margin: float) -> dict:
    """One-sided Welch test of H0: mean(theirs) - mean(ours) <= margin, against H1: it is > margin (lower is better)."""
    n1, m1 = len(ours), statistics.fmean(ours)
    v1 = statistics.variance(ours) if n1 > 1 else 0.0
    v2 = theirs_std ** 2
    se2 = v1 / n1 + v2 / theirs_n
    diff = theirs_mean - m1
    # Welch-Satterthwaite; a sample of one seed adds no variance estimate (and no degrees of freedom)
    den = (v1 / n1) ** 2 / (n1 - 1) if n1 > 1 else 0.0
    den += (v2 / theirs_n) ** 2 / (theirs_n - 1) if theirs_n > 1 else 0.0
    if se2 == 0 or den == 0:
        return {"improvement": diff, "t": None, "df": None, "p_value": None,
                "note": "no variance estimate (need at least 2 seeds on a side with a spread): p-value undefined"}
    t = (diff - margin) / math.sqrt(se2)
    df = se2 ** 2 / den
    return {"improvement": diff, "t": t, "df": df, "p_value": student_t_sf(t, df)}


def parse_comparison(text: str, flag: str) -> tuple[float, float, int, list[float] | None]:
    """'1.11,1.12,1.10' (per-seed values) or 'mean:1.11,std:0.004,n:3' -> (mean, sample std, n, values)."""
    try:
        if ":" in text:
            parts = dict(p.split(":", 1) for p in text.replace(" ", "").split(","))
            if set(parts) != {"mean", "std", "n"}:
                raise ValueError
            n = int(parts["n"])
            if n < 1 or float(parts["std"]) < 0:
                raise ValueError
            return float(parts["mean"]), float(parts["std"]), n, None
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
        if not values:
            raise ValueError
    except ValueError:
        raise PackageError(f"{flag} {text!r}: give per-seed values '1.11,1.12,1.10' or 'mean:M,std:S,n:N'") from None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values), values


def compare(results: list[dict], args) -> dict | None:
    """Improvement over the current record in nats per token and the Welch test of the >= 0.005-nat bar."""
    if not args.compare_loss and not args.compare_bpb:
        return None
    # nats/token = bpb * ln 2 * bytes / tokens; every seed scores the same val stream, so the ratio is shared
    bytes_per_token = statistics.fmean(r["scored_bytes"] / r["scored_tokens"] for r in results)
    to_nats = math.log(2) * bytes_per_token
    ours = [r["val_loss"] for r in results]
    if args.compare_loss:
        mean, std, n, values = parse_comparison(args.compare_loss, "--compare-loss")
        metric = "val_loss (nats per token)"
    else:
        mean, std, n, values = parse_comparison(args.compare_bpb, "--compare-bpb")
        mean, std = mean * to_nats, std * to_nats
        values = [v * to_nats for v in values] if values else None
        metric = (f"val_bpb, converted to nats per token with this submission's {bytes_per_token:.6f} UTF-8 bytes "
                  f"per scored token (same tokenizer and validation split assumed)")
    test = welch_test(ours, mean, std, n, MIN_IMPROVEMENT_NATS)
    p = test["p_value"]
    return {
        "against": args.compare_name,
        "metric": metric,
        "record_val_loss_mean": mean,
        "record_val_loss_std": std,
        "record_n": n,
        "record_values": values,
        "val_loss_mean": statistics.fmean(ours),
        "improvement_nats": test["improvement"],
        "improvement_bpb": test["improvement"] / to_nats,
        "test": f"one-sided Welch t-test, H0: improvement <= {MIN_IMPROVEMENT_NATS} nats, "
                f"H1: improvement > {MIN_IMPROVEMENT_NATS} nats (sample variances, Welch-Satterthwaite df)",
        "t": test["t"],
        "df": test["df"],
        "p_value": p,
        "required_improvement_nats": MIN_IMPROVEMENT_NATS,
        "required_p_below": MAX_P_VALUE,
        "meets_record_bar": bool(p is not None and p < MAX_P_VALUE and test["improvement"] >= MIN_IMPROVEMENT_NATS),
        **({"note": test["note"]} if "note" in test else {}),
    }


# ==================================================================================================
# Causality harness
# ==================================================================================================

def run_harness(repo_root: Path, source: str, timeout: float = 1800) -> dict:
    """Run the SLOT/TTT causality tests against the code the logs ran. Never reports 'passed' unless tests passed."""
    missing = [f for f in HARNESS_FILES if not (repo_root / f).is_file()]
    if missing:
        return {"status": "not_available", "detail": f"{', '.join(missing)} does not exist in {repo_root}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *HARNESS_FILES]
    with tempfile.TemporaryDirectory() as tmp:
        cwd = repo_root
        script = repo_root / "train_gpt.py"
        if not script.is_file() or script.read_text(encoding="utf-8") != source:
            # the repository moved on since the runs: test a copy of tests/ beside the logged train_gpt.py
            cwd = Path(tmp)
            shutil.copytree(repo_root / "tests", cwd / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            (cwd / "train_gpt.py").write_text(source, encoding="utf-8")
        try:
            r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "detail": f"timed out after {timeout:.0f} s", "command": " ".join(cmd[2:])}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else r.stderr.strip()[-300:]
    if r.returncode == 0 and re.search(r"\d+ passed", summary):
        status = "passed"
    elif r.returncode in (0, 5):    # nothing ran (all skipped / no tests collected): not evidence either way
        status = "not_available"
    else:
        status = "failed"
    return {"status": status, "detail": summary, "command": "python -m pytest -q " + HARNESS}


# ==================================================================================================
# The submission
# ==================================================================================================

def load_logs(paths: list[Path], allow_non_record: bool) -> tuple[list[RunLog], list[str]]:
    logs = [read_log(p) for p in paths]
    for log in logs:
        check_complete(log)
        check_limits(log)
    check_same_run(logs)
    reasons = not_record_reasons(logs[0])   # check_same_run made every log's hardware and config the same
    if reasons and not allow_non_record:
        raise PackageError(f"{logs[0].path} {reasons[0]}: not a valid record run; pass --allow-non-record to "
                           f"package it anyway, marked as not a record")
    return logs, reasons


def metadata(args) -> dict:
    meta = {}
    if args.meta:
        try:
            meta = json.loads(args.meta.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise PackageError(f"--meta {args.meta}: cannot read a JSON object: {e}") from None
    out = {}
    for key in ("author", "github_id", "name", "blurb"):
        value = getattr(args, key)
        out[key] = value if value is not None else meta.get(key)
    return out


def pending_submission(meta: dict) -> dict:
    """The honest form before any record run: no score, nothing invented."""
    return {**meta, "date": None, "track": TRACK,
            "status": f"pending: no {RECORD_GPUS} x {RECORD_GPU} record logs yet; every score field is null until "
                      f"tools/package_record.py is run on real logs",
            "record": False, "val_loss": None, "val_loss_std": None, "val_bpb": None, "val_bpb_std": None,
            "seeds": [], "seed_results": [], "bytes_total": None, "bytes_code": None, "hardware": None,
            "pytorch_version": None, "compliance": None}


def make_submission(logs: list[RunLog], reasons: list[str], meta: dict, date: str, harness: dict,
                    comparison: dict | None, code: str | None = None) -> dict:
    """`code` is the train_gpt.py the folder ships (default: the logged code); bytes_total counts it."""
    results = [seed_result(log) for log in logs]
    code = logs[0].source if code is None else code
    loss, loss_std = mean_std([r["val_loss"] for r in results])
    bpb, bpb_std = mean_std([r["val_bpb"] for r in results])
    first = logs[0]
    versions = first.last("python") or {}
    name, count = hardware(first)
    max_train = max(r["train_time_s"] for r in results)
    max_eval = max(r["eval_time_s"] for r in results)
    shipped_bytes = len(code.encode("utf-8"))
    max_bytes = shipped_bytes + max(r["bytes_model"] for r in results)
    record = not reasons
    return {
        **meta,
        "date": date,
        "track": TRACK,
        "status": "record" if record else "NOT A RECORD: " + "; ".join(reasons),
        "record": record,
        "val_loss": loss,
        "val_loss_std": loss_std,
        "val_bpb": bpb,
        "val_bpb_std": bpb_std,
        "score_line": results[0]["score_line"],
        "seeds": [r["seed"] for r in results],
        "seed_results": results,
        "bytes_total": max_bytes,
        "bytes_code": shipped_bytes,
        "bytes_code_logged": results[0]["bytes_code"],
        "code_compressed": unwrap_source(code) is not None,
        "hardware": first.device,
        "pytorch_version": versions.get("torch"),
        "python_version": versions.get("python"),
        "env_overrides": env_overrides(first),
        "compliance": {
            "train_under_600s": max_train * 1000 <= TRAIN_LIMIT_MS,
            "max_train_time_s": max_train,
            "eval_under_600s": max_eval * 1000 <= EVAL_LIMIT_MS,
            "max_eval_time_s": max_eval,
            "eval_10pct_headroom": max_eval * 1000 <= 0.9 * EVAL_LIMIT_MS,
            "artifact_under_16mb": max_bytes <= ARTIFACT_LIMIT_BYTES and max(r["bytes_total"] for r in results) <= ARTIFACT_LIMIT_BYTES,
            "max_bytes_total": max_bytes,
            "max_bytes_total_logged": max(r["bytes_total"] for r in results),
            "causality_harness": harness["status"],
            "causality_harness_detail": harness.get("detail"),
            "device": name,
            "world_size": count,
            "record_hardware": record,
        },
        **({"comparison": comparison} if comparison else {}),
    }


def fmt(v, digits: int) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def render_readme(sub: dict, description: str) -> str:
    """README.md of the records folder: the user's text, then tables generated from submission.json."""
    c, rows = sub["compliance"], sub["seed_results"]
    out = [f"# {sub['name']}", ""]
    if not sub["record"]:
        out += [f"> **{sub['status']}**", ""]
    out += [f"**val_bpb {fmt(sub['val_bpb'], 4)}** (std {fmt(sub['val_bpb_std'], 4)}, {len(rows)} seeds) · "
            f"val_loss {fmt(sub['val_loss'], 4)} nats · code + artifact <= {sub['bytes_total']:,} bytes · {sub['hardware']}", ""]
    if sub.get("author"):
        out += [f"Author: {sub['author']}" + (f" (@{sub['github_id']})" if sub.get("github_id") else ""), ""]
    text = (description or sub.get("blurb") or "").strip()
    if text:
        out += [text, ""]
    full = all(r["scored_tokens"] == OFFICIAL_VAL_TARGETS for r in rows)
    coverage = "every target of the official validation set scored once" if full else \
        f"{rows[0]['scored_tokens']:,} targets scored once, NOT the full official validation set"
    out += ["## Results", "", f"Score line: `{sub['score_line']}` (exact; {coverage}).", "",
            "| seed | steps | step avg (ms) | train (s) | eval (s) | val_loss | val_bpb | code + artifact bytes (as run) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['seed']} | {r['steps']} | {r['step_avg_ms']:.2f} | {r['train_time_s']:.1f} | "
                   f"{r['eval_time_s']:.1f} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['bytes_total']:,} |")
    out.append(f"| **mean** | | | | | **{sub['val_loss']:.8f}** | **{sub['val_bpb']:.8f}** | {sub['bytes_total']:,} (max, shipped code) |")
    out.append(f"| std | | | | | {fmt(sub['val_loss_std'], 8)} | {fmt(sub['val_bpb_std'], 8)} | |")
    out.append("")
    cmp_ = sub.get("comparison")
    if cmp_:
        p_text = "n/a" if cmp_["p_value"] is None else f"{cmp_['p_value']:.3g}"
        out += ["## Against the current record", "",
                f"Compared with {cmp_['against'] or 'the current record'} ({cmp_['metric']}): improvement "
                f"**{cmp_['improvement_nats']:.5f} nats** ({cmp_['improvement_bpb']:.5f} bpb).",
                f"{cmp_['test']}: t = {fmt(cmp_['t'], 3)}, df = {fmt(cmp_['df'], 2)}, "
                f"p = {p_text}; "
                f"record bar (>= {cmp_['required_improvement_nats']} nats, p < {cmp_['required_p_below']}): "
                f"{'met' if cmp_['meets_record_bar'] else 'NOT met'}.", ""]
    mark = lambda ok: "x" if ok else " "  # noqa: E731
    out += ["## Compliance", "",
            f"- [{mark(c['train_under_600s'])}] training <= 600 s (max {c['max_train_time_s']:.1f} s)",
            f"- [{mark(c['eval_under_600s'])}] evaluation <= 600 s, whole eval phase (max {c['max_eval_time_s']:.1f} s"
            f"{'' if c['eval_10pct_headroom'] else ', less than 10% headroom'})",
            f"- [{mark(c['artifact_under_16mb'])}] code + compressed model <= {ARTIFACT_LIMIT_BYTES:,} bytes "
            f"(max {c['max_bytes_total']:,} with the shipped train_gpt.py of {sub['bytes_code']:,} bytes"
            + (f", compressed from the {sub['bytes_code_logged']:,} bytes the runs logged" if sub["code_compressed"] and
               sub["bytes_code"] != sub["bytes_code_logged"] else "") + ")",
            f"- [{mark(c['causality_harness'] == 'passed')}] SLOT/TTT causality harness (`{HARNESS}`): "
            f"{c['causality_harness']}",
            f"- [{mark(c['record_hardware'])}] hardware: {sub['hardware']}", ""]
    env = " ".join(f"{k}={v}" for k, v in sub["env_overrides"].items())
    out += ["## Reproduce", "", "```bash",
            f"for SEED in {' '.join(str(s) for s in sub['seeds'])}; do",
            f"  RUN_ID=seed$SEED SEED=$SEED {env + ' ' if env else ''}torchrun --standalone "
            f"--nproc_per_node={c['world_size']} train_gpt.py",
            "done", "```", "",
            f"PyTorch {sub['pytorch_version']}, Python {sub['python_version']}. Logs: "
            + ", ".join(f"`{r['log']}`" for r in rows) + ". Generated by `tools/package_record.py` from the logs.", ""]
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def folder_slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")
    if not slug:
        raise PackageError(f"--name {name!r} gives an empty folder name")
    return slug


def write_folder(dest: Path, sub: dict, logs: list[RunLog], readme: str, requirements: Path, force: bool, code: str) -> None:
    """Build the folder beside dest and rename it into place; with --force the old one goes only at the end."""
    if dest.exists() and not force:
        raise PackageError(f"{dest} already exists; pass --force to replace it")
    if not requirements.is_file():
        raise PackageError(f"--requirements {requirements}: no such file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)   # mkdtemp makes it private; a records folder is meant to be shared
    try:
        (tmp / "train_gpt.py").write_bytes(code.encode("utf-8"))
        for log in logs:
            (tmp / f"train_seed{log.seed}.log").write_bytes(log.raw.encode("utf-8"))
        shutil.copyfile(requirements, tmp / "requirements.txt")
        (tmp / "submission.json").write_text(json.dumps(sub, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(readme, encoding="utf-8")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="*", type=Path, help="logs/<RUN_ID>.txt written by train_gpt.py, one per seed")
    p.add_argument("--name", help="submission name (also the folder name: YYYY-MM-DD_<Name>)")
    p.add_argument("--author", help="author's name")
    p.add_argument("--github-id", help="author's GitHub user name")
    p.add_argument("--blurb", help="one-paragraph summary for submission.json (and the README if no --description)")
    p.add_argument("--description", type=Path, help="markdown file: your write-up, placed in README.md")
    p.add_argument("--meta", type=Path, help="JSON file with author / github_id / name / blurb (the flags win)")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    p.add_argument("--records-dir", type=Path, default=RECORDS_DIR, help=f"where the folder goes (default {RECORDS_DIR})")
    p.add_argument("--summary-only", type=Path, metavar="FILE",
                   help="write only submission.json to FILE (no folder); with no logs, the pending form")
    p.add_argument("--compare-loss", help="current record's val_loss: per-seed 'a,b,c' or 'mean:M,std:S,n:N'")
    p.add_argument("--compare-bpb", help="current record's val_bpb, same forms (converted to nats per token)")
    p.add_argument("--compare-name", help="what the comparison is, e.g. 'PR #1234'")
    p.add_argument("--allow-non-record", action="store_true",
                   help="accept logs not from 8 x H100 (CPU, fewer GPUs); the submission is marked NOT A RECORD")
    p.add_argument("--skip-harness", action="store_true", help=f"do not run {HARNESS} (recorded as skipped)")
    p.add_argument("--repo-root", type=Path, default=ROOT, help="repository holding tests/ for the harness (default: this one)")
    p.add_argument("--requirements", type=Path, default=ROOT / "requirements.txt", help="requirements.txt to include")
    p.add_argument("--force", action="store_true", help="replace an existing records folder")
    p.add_argument("--readable-code", action="store_true",
                   help="ship the logged train_gpt.py as it is instead of its compressed wrapper (lzma + base85)")
    p.add_argument("--compress-code", type=Path, metavar="OUT",
                   help="only write the compressed wrapper of <repo-root>/train_gpt.py to OUT (to run the seeds with it)")
    return p


def run(args) -> str:
    if args.compress_code:
        source = (args.repo_root / "train_gpt.py").read_text(encoding="utf-8")
        if args.compress_code.exists():
            raise PackageError(f"--compress-code {args.compress_code} already exists")
        write_atomic(args.compress_code, wrap_source(source))
        return (f"wrote {args.compress_code}: {len(wrap_source(source).encode()):,} bytes "
                f"(the readable train_gpt.py is {len(source.encode()):,})")
    meta = metadata(args)
    if args.compare_loss and args.compare_bpb:
        raise PackageError("give --compare-loss or --compare-bpb, not both")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        raise PackageError(f"--date {args.date!r} must be YYYY-MM-DD")
    if not args.logs:
        if args.summary_only is None:
            raise PackageError("no logs given: pass one log per seed (or --summary-only FILE for the pending form)")
        write_atomic(args.summary_only, json.dumps(pending_submission(meta), indent=2) + "\n")
        return f"wrote {args.summary_only} (pending: no logs)"
    if args.summary_only is None:
        for key in ("name", "author", "github_id"):
            if not meta[key]:
                raise PackageError(f"--{key.replace('_', '-')} is required for a records folder")
    description = ""
    if args.description:
        try:
            description = args.description.read_text(encoding="utf-8")
        except OSError as e:
            raise PackageError(f"--description {args.description}: {e}") from None
    logs, reasons = load_logs(args.logs, args.allow_non_record)
    comparison = compare([seed_result(log) for log in logs], args)
    harness = {"status": "skipped", "detail": "--skip-harness"} if args.skip_harness else run_harness(args.repo_root, logs[0].source)
    if harness["status"] == "failed":
        raise PackageError(f"the causality harness failed on the logged train_gpt.py: {harness['detail']} "
                           f"(run `python -m pytest -q {HARNESS}`)")
    code = shipped_code(logs[0].source, args.readable_code)
    model_bytes = max(int(log.number("code_bytes", "model_bytes")) for log in logs)
    if len(code.encode("utf-8")) + model_bytes > ARTIFACT_LIMIT_BYTES:   # the runs counted the wrapper's bytes
        raise PackageError(f"--readable-code: {len(code.encode('utf-8')):,} bytes of code + {model_bytes:,} of model "
                           f"exceed the {ARTIFACT_LIMIT_BYTES:,}-byte limit; ship the compressed wrapper")
    sub = make_submission(logs, reasons, meta, args.date, harness, comparison, code)
    if args.summary_only is not None:
        write_atomic(args.summary_only, json.dumps(sub, indent=2) + "\n")
        return f"wrote {args.summary_only}"
    dest = args.records_dir / f"{args.date}_{folder_slug(meta['name'])}"
    write_folder(dest, sub, logs, render_readme(sub, description), args.requirements, args.force, code)
    cmp_ = f"; improvement {comparison['improvement_nats']:.5f} nats, p = {comparison['p_value']}" if comparison else ""
    repo_script = args.repo_root / "train_gpt.py"
    stale = repo_script.is_file() and repo_script.read_bytes() != logs[0].source.encode("utf-8")
    note = f"\nnote: {repo_script} differs from the code the logs ran; the folder holds the logged code" if stale else ""
    return f"wrote {dest}: val_bpb {sub['val_bpb']:.8f} over seeds {sub['seeds']} ({sub['status']}{cmp_}){note}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
    except PackageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

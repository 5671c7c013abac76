"""The real script, start to finish on a CPU: train -> export -> read back -> sliding eval, and every bad input."""
import shutil

import numpy as np
import pytest

import train_gpt as T
from helpers import ROOT, parse_log, run_script, script_env, write_shard


@pytest.fixture(scope="module")
def full_run(tiny_data, tmp_path_factory):
    data, tok = tiny_data
    work = tmp_path_factory.mktemp("e2e")
    env = script_env(data, tok, work / "logs", RUN_ID="e2e", NLL_DUMP_PATH=str(work / "nll.npy"), EVAL_COMPARE_PLAIN="1")
    r = run_script(env, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, env, r


def eval_again(full_run, run_id, **settings):
    """PHASES=eval on the artifact of full_run with extra settings; returns the parsed log."""
    work, env, _ = full_run
    env2 = dict(env, PHASES="eval", RUN_ID=run_id, ARTIFACT_PATH=str(work / "logs" / "e2e.pgz"), **settings)
    env2.pop("NLL_DUMP_PATH")
    r = run_script(env2, work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return parse_log(work / "logs" / f"{run_id}.txt")


def test_log_is_complete(full_run):
    work, env, r = full_run
    text = (work / "logs" / "e2e.txt").read_text()
    source = (ROOT / "train_gpt.py").read_text()
    assert text.startswith(source + "\n" + "=" * 100 + "\n"), "the log opens with the exact source"
    lines = parse_log(work / "logs" / "e2e.txt")
    for key in ("run_id", "config.seed", "config.recur_layers", "python", "model_params", "step", "train_done",
                "code_bytes", "final_sliding_window_exact", "slot_settings", "lora_settings", "phase_settings",
                "final_document_lora_slot_exact", "eval_done"):
        assert key in lines, key
    assert "ttt_settings" not in lines, "the document mode adapts with LoRA and phases, not the stream's TTT"
    assert int(lines["model_params"]["model_params"]) > 0
    assert lines["step"]["step"] == "6/6" and "train_loss" in lines["step"]
    final = lines["final_document_lora_slot_exact"]    # the default evaluation: documents, LoRA, SLOT (and phases)
    assert int(final["slot_steps_min"]) == int(lines["slot_settings"]["steps"]) > 0   # no budget cut on this tiny run
    assert int(final["budget_cuts"]) == 0 and lines["eval_documents"]["lora"] == "1"
    assert final["scored_tokens"] == lines["final_sliding_window_exact"]["scored_tokens"]
    assert len(final["val_loss"].split(".")[1]) == 8 and len(final["val_bpb"].split(".")[1]) == 8
    assert float(final["val_bpb"]) > 0 and final["eval_time"].endswith("ms")


def test_sizes_add_up(full_run):
    work, env, r = full_run
    b = parse_log(work / "logs" / "e2e.txt")["code_bytes"]
    artifact = work / "logs" / "e2e.pgz"
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    assert int(b["source_bytes"]) == len(source.encode()) > int(b["code_bytes"])
    assert int(b["code_bytes"]) == len(T.wrap_source(source).encode()), "the budget counts the shipped wrapper"
    assert int(b["model_bytes"]) == artifact.stat().st_size
    assert int(b["total_submission_bytes"]) == int(b["code_bytes"]) + int(b["model_bytes"])


def test_eval_alone_reproduces_the_score(full_run):
    work, env, r = full_run
    first = parse_log(work / "logs" / "e2e.txt")
    again = eval_again(full_run, "e2e_eval")
    for name in ("final_sliding_window_exact", "final_document_lora_slot_exact"):
        assert again[name]["val_loss"] == first[name]["val_loss"] and again[name]["val_bpb"] == first[name]["val_bpb"]
    assert "train_done" not in again


def test_slot_steps_zero_is_the_plain_sliding_eval(full_run):
    work, env, r = full_run
    plain = eval_again(full_run, "plain", EVAL_MODE="stream", SLOT_STEPS="0", TTT_EPOCHS="0")
    assert not {"final_slot_exact", "final_slot_ttt_exact", "slot_settings", "ttt_settings"} & set(plain)
    first = parse_log(work / "logs" / "e2e.txt")["final_sliding_window_exact"]
    assert plain["final_sliding_window_exact"]["val_loss"] == first["val_loss"]


def test_nll_dump(full_run, tiny_data):
    work, env, r = full_run
    nll = np.load(work / "nll.npy")
    val = np.fromfile(tiny_data[0] / "fineweb_val_000000.bin", dtype="<u2", offset=1024)
    final = parse_log(work / "logs" / "e2e.txt")["final_document_lora_slot_exact"]   # the dump: the scored evaluation
    assert nll.dtype == np.float64 and len(nll) == len(val) - 1 == int(final["scored_tokens"])
    assert float(final["val_loss"]) == pytest.approx(nll.mean(), abs=1e-8)


def test_eval_refuses_settings_that_contradict_the_artifact(full_run):
    work, env, r = full_run
    env2 = dict(env, PHASES="eval", RUN_ID="clash", ARTIFACT_PATH=str(work / "logs" / "e2e.pgz"), NUM_LAYERS="5")
    r2 = run_script(env2, work)
    assert r2.returncode == 1 and "NUM_LAYERS=5 (artifact: 3)" in r2.stdout


def _fails(env, cwd, fragment):
    r = run_script(env, cwd)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-2000:]
    assert fragment in out, out[-2000:]
    assert not list(cwd.rglob("*.pgz")), "no artifact may be written by a failed run"
    return out


def test_missing_data(tiny_data, tmp_path):
    env = script_env(tmp_path / "nowhere", tiny_data[1], tmp_path / "logs", RUN_ID="x")
    _fails(env, tmp_path, "no train shards match")


def test_bad_shard_magic(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0], data)
    write_shard(data / "fineweb_train_000001.bin", [1, 2, 3], magic=7)
    env = script_env(data, tiny_data[1], tmp_path / "logs", RUN_ID="x", ITERATIONS="200")
    _fails(env, tmp_path, "fineweb_train_000001.bin: bad header (magic 7")


def test_token_out_of_vocab(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data[0], data)
    write_shard(data / "fineweb_train_000000.bin", [1, 5, 400, 6] * 300)
    env = script_env(data, tiny_data[1], tmp_path / "logs", RUN_ID="x")
    _fails(env, tmp_path, "token id 400 >= VOCAB_SIZE=320")


def test_tokenizer_vocab_mismatch_fails_before_training(tiny_data, tmp_path):
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", RUN_ID="x", VOCAB_SIZE="1024")
    out = _fails(env, tmp_path, "has 320 pieces but VOCAB_SIZE=1024")
    assert "step:" not in out


def test_misspelt_setting(tiny_data, tmp_path):
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", RUN_ID="x", NUM_LAYER="2")
    _fails(env, tmp_path, "did you mean NUM_LAYERS?")


def test_non_finite_loss_stops_and_exports_nothing(tiny_data, tmp_path):
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", RUN_ID="x",
                     MATRIX_LR="1e30", SCALAR_LR="1e30", TIED_EMBED_LR="1e30")
    out = _fails(env, tmp_path, "non-finite training loss at step")
    assert "error: non-finite" in (tmp_path / "logs" / "x.txt").read_text()


def test_wallclock_cap_stops_training(tiny_data, tmp_path):
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", RUN_ID="cap", ITERATIONS="100000",
                     MAX_WALLCLOCK_SECONDS="1.5", PHASES="train,export")
    r = run_script(env, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = parse_log(tmp_path / "logs" / "cap.txt")
    assert "stopping_early" in lines
    assert int(lines["train_done"]["steps"]) < 100000
    # The loop stops when the next step would not fit at the pace of the slowest recent step: under the cap on steady
    # hardware. A step that is suddenly slower than all recent ones (a loaded CI machine) can still overrun by a step.
    step_ms = float(lines["train_done"]["step_avg"].removesuffix("ms"))
    assert int(lines["train_done"]["train_time"].removesuffix("ms")) <= 1500 + 2 * step_ms


def test_val_tokens_limits_the_evaluation(full_run):
    lines = eval_again(full_run, "short", VAL_TOKENS="301")
    assert lines["eval_tokens"]["eval_tokens"] == "301" and lines["config.val_tokens"]["config.val_tokens"] == "301"
    assert lines["final_document_lora_slot_exact"]["scored_tokens"] == "300"


def test_eval_reusing_the_run_id_keeps_the_training_log(full_run):
    """PHASES=eval with the training RUN_ID finds logs/<RUN_ID>.pgz by default and logs to <RUN_ID>_2.txt."""
    work, env, _ = full_run
    before = (work / "logs" / "e2e.txt").read_bytes()
    env2 = dict(env, PHASES="eval")
    env2.pop("NLL_DUMP_PATH")
    r = run_script(env2, work)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (work / "logs" / "e2e.txt").read_bytes() == before
    again = parse_log(work / "logs" / "e2e_2.txt")
    name = "final_document_lora_slot_exact"
    assert again[name]["val_loss"] == parse_log(work / "logs" / "e2e.txt")[name]["val_loss"]


def test_eval_settings_are_checked_against_the_artifact_first(full_run):
    """NUM_LAYERS=2 against a 3-layer artifact, RECUR_LAYERS left at its default: the error is the clash."""
    work, env, _ = full_run
    env2 = {k: v for k, v in env.items() if k != "RECUR_LAYERS"}
    env2.update(PHASES="eval", RUN_ID="clash2", ARTIFACT_PATH=str(work / "logs" / "e2e.pgz"), NUM_LAYERS="2")
    r = run_script(env2, work)
    assert r.returncode == 1 and "settings disagree with the artifact's model: NUM_LAYERS=2 (artifact: 3)" in r.stdout


def test_eval_log_names_the_artifact_model(full_run):
    lines = eval_again(full_run, "named")
    model = lines["artifact_model"]
    assert model["num_layers"] == "3" and model["recur_layers"] == "1" and int(model["params"]) > 0


def test_exporting_again_with_a_run_id_keeps_the_old_artifact(full_run, tmp_path):
    work, env, _ = full_run
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "again.txt").write_text("an older run\n")
    (logs / "again.pgz").write_bytes(b"older artifact")
    env2 = dict(env, RUN_ID="again", PHASES="train,export", LOG_DIR=str(logs))
    env2.pop("NLL_DUMP_PATH")
    r = run_script(env2, tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (logs / "again.pgz").read_bytes() == b"older artifact" and (logs / "again.txt").read_text() == "an older run\n"
    assert (logs / "again_2.pgz").is_file() and "artifact:" in (logs / "again_2.txt").read_text()


def test_explicit_artifact_path_is_never_replaced(tiny_data, tmp_path):
    old = tmp_path / "mine.pgz"
    old.write_bytes(b"a model I want to keep")
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", RUN_ID="x", ARTIFACT_PATH=str(old))
    r = run_script(env, tmp_path)
    assert r.returncode == 1 and f"artifact {old} already exists; an exporting run never replaces" in r.stdout + r.stderr
    assert old.read_bytes() == b"a model I want to keep" and "step:" not in r.stdout, "it stops before training"


@pytest.mark.parametrize("settings, fragment", [
    ({}, "PHASES=eval needs ARTIFACT_PATH"),
    ({"RUN_ID": ""}, "PHASES=eval needs ARTIFACT_PATH"),
    ({"ARTIFACT_PATH": "."}, "is a folder; name the artifact file"),
])
def test_eval_needs_an_artifact_file(tiny_data, tmp_path, settings, fragment):
    env = script_env(tiny_data[0], tiny_data[1], tmp_path / "logs", PHASES="eval")
    env.pop("RUN_ID", None)
    env.update(settings)
    _fails(env, tmp_path, fragment)
    if not settings.get("ARTIFACT_PATH"):
        assert not (tmp_path / "logs").exists(), "refused before any log is opened"

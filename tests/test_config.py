"""Config: typed env overrides, and a misspelt setting is an error that names the right one."""
import dataclasses
import re
from pathlib import Path

import pytest

import train_gpt as T


def test_defaults_are_the_submitted_model():
    cfg, explicit = T.config_from_env({})
    assert explicit == set()
    assert (cfg.num_layers, cfg.model_dim, cfg.vocab_size, cfg.recur_layers) == (11, 512, 1024, (4, 5))
    assert cfg.recur_start_frac == 0.35 and (cfg.compile, cfg.autocast) == ("auto", "auto")
    assert (cfg.train_batch_tokens, cfg.train_seq_len, cfg.max_wallclock_seconds) == (786_432, 2048, 600.0)
    assert (cfg.eval_seq_len, cfg.eval_stride) == (2048, 64)


def test_overrides_are_typed():
    cfg, explicit = T.config_from_env({"NUM_LAYERS": "9", "MATRIX_LR": "0.03", "COMPILE": "0", "RECUR_LAYERS": "3,4,5",
                                       "RUN_ID": "abc", "PATH": "/bin"})
    assert cfg.num_layers == 9 and cfg.matrix_lr == 0.03 and cfg.compile == "0"
    assert cfg.recur_layers == (3, 4, 5) and cfg.run_id == "abc"
    assert explicit == {"num_layers", "matrix_lr", "compile", "recur_layers", "run_id"}


@pytest.mark.parametrize("env, compiled, amp", [
    ({}, False, None),                                        # a CPU's defaults: eager, float32
    ({"COMPILE": "1", "AUTOCAST": "bf16"}, True, T.torch.bfloat16),   # the GPU's path, on a CPU
    ({"COMPILE": "0", "AUTOCAST": "off"}, False, None),
])
def test_compile_and_autocast_resolve_for_the_device(env, compiled, amp):
    cfg, _ = T.config_from_env(env)
    run = T.start_run({}, cfg)
    assert (run.compiled, run.amp) == (compiled, amp)


@pytest.mark.parametrize("env, fragment", [({"COMPILE": "yes"}, "COMPILE='yes' must be one of 1, 0, auto"),
                                           ({"AUTOCAST": "fp16"}, "AUTOCAST='fp16' must be one of bf16, off, auto")])
def test_compile_and_autocast_values_are_checked(env, fragment):
    with pytest.raises(T.RunError, match=re.escape(fragment)):
        T.config_from_env(env)


def test_empty_recur_layers_is_the_plain_model():
    cfg, _ = T.config_from_env({"RECUR_LAYERS": ""})
    assert cfg.recur_layers == ()


@pytest.mark.parametrize("env, fragment", [
    ({"NUM_LAYER": "9"}, "did you mean NUM_LAYERS"),
    ({"SEEDS": "1"}, "did you mean SEED"),
    ({"EVAL_STRID": "32"}, "did you mean EVAL_STRIDE"),
    ({"WARMDOWN_ITERS": "3500"}, "WARMDOWN_FRAC"),
    ({"SLOT_OPTIMIZER": "lbfgs"}, "SLOT always uses AdamW"),
    ({"SLOT_ENABLED": "0"}, "use SLOT_STEPS"),
    ({"TTT_ENABLED": "1"}, "use TTT_EPOCHS"),
    ({"MAX_WALLCLOCK": "600"}, "use MAX_WALLCLOCK_SECONDS"),
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS='eleven' is not a valid int"),
    ({"COMPILE": "maybe"}, "COMPILE='maybe'"),
    ({"NUM_HEADS": "7"}, "MODEL_DIM=512 must be divisible by NUM_HEADS=7"),
    ({"NUM_KV_HEADS": "3"}, "NUM_HEADS=8 must be divisible by NUM_KV_HEADS=3"),
    ({"RECUR_LAYERS": "4,11"}, "RECUR_LAYERS=(4, 11) must name layers in 0..10"),
    ({"RECUR_LAYERS": "4,4"}, "repeats a layer"),
    ({"EVAL_STRIDE": "4096"}, "EVAL_STRIDE=4096 must be <= EVAL_SEQ_LEN=2048"),
    ({"PHASES": "export"}, "PHASES='export'"),
    ({"MATRIX_LR": "nan"}, "MATRIX_LR=nan must be a finite number"),
    ({"ROPE_DIMS": "15"}, "ROPE_DIMS=15 must be even"),
])
def test_bad_settings_name_the_value(env, fragment):
    with pytest.raises(T.RunError, match=None) as e:
        T.config_from_env(env)
    assert fragment in str(e.value)


def test_unrelated_environment_is_ignored():
    env = {"OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "LOCAL_WORLD_SIZE": "8", "PYTHONPATH": "x",
           "TORCHELASTIC_RUN_ID": "1", "MASTER_PORT": "29500", "HF_ENDPOINT": "http://x", "CUDA_VISIBLE_DEVICES": "0",
           "NUM_THREADS": "8", "MKL_NUM_THREADS": "1", "SEED_TEXT": "x"}
    T.config_from_env(env)


def test_world_size_must_divide_eight():
    with pytest.raises(T.RunError, match="WORLD_SIZE=3 must divide 8"):
        T.start_run({"WORLD_SIZE": "3", "RANK": "0"})


def test_redirects_name_real_settings():
    """Every setting a NOT_OURS hint points to exists, so the redirect cannot send a user to another dead name."""
    ours = {f.name.upper() for f in dataclasses.fields(T.Config)}
    named = {key: set(re.findall(r"(?:\buse |\()([A-Z][A-Z0-9_]+)\b", hint)) for key, hint in T.NOT_OURS.items()}
    assert named["NUM_ITERATIONS"] == {"ITERATIONS"} and named["SWA_ENABLED"] == {"EMA_DECAY"}
    for key, names in named.items():
        assert names <= ours, (key, names - ours)


def test_readme_settings_table_documents_every_setting_with_its_default_and_source():
    readme = (Path(T.__file__).parent / "README.md").read_text()
    table = readme.split("\n## Settings\n")[1].split("\n## ")[0].split("\n### ")[0]   # the table, not its sections
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| `")]
    assert rows and all(len(row) == 4 and row[1] for row in rows), "every row: settings | source | CPU study | what"
    for f in dataclasses.fields(T.Config):
        name = f.name.upper()
        assert f"`{name}`" in table, f"the Settings table lacks {name}"
        shown = re.search(rf"`{name}` ([0-9][0-9.,]*)", table)   # "`NAME` 1024" (paths and lists in parentheses)
        if shown and isinstance(f.default, (int, float)):
            assert float(shown.group(1).rstrip(",.")) == f.default, (name, shown.group(1), f.default)


def test_ci_runs_the_readme_test_command():
    root = Path(T.__file__).parent
    readme = (root / "README.md").read_text().splitlines()
    command = readme[readme.index("<!-- test-command -->") + 2]
    ci_lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert command.startswith("pip install") and command in ci_lines


def test_data_and_tokenizer_paths_follow_the_vocabulary():
    """VOCAB_SIZE=8192 alone finds what `data/download.py --variant sp8192` wrote; explicit paths win."""
    cfg, _ = T.config_from_env({"VOCAB_SIZE": "8192"})
    assert cfg.data_path == "./data/datasets/fineweb10B_sp8192"
    assert cfg.tokenizer_path == "./data/tokenizers/fineweb_8192_bpe.model"
    assert T.Config().data_path == "./data/datasets/fineweb10B_sp1024"
    cfg, _ = T.config_from_env({"VOCAB_SIZE": "4096", "DATA_PATH": "/d", "TOKENIZER_PATH": "/t.model"})
    assert (cfg.data_path, cfg.tokenizer_path) == ("/d", "/t.model")


@pytest.mark.parametrize("env, states", [
    ({}, [(False, False), (True, False), (True, True)]),                      # the default: off, on, on with QAT
    ({"RECUR_START_FRAC": "0"}, [(True, False), (True, True)]),
    ({"RECUR_LAYERS": ""}, [(True, False), (True, True)]),                    # nothing to switch: one graph less
    ({"LATE_QAT_FRAC": "0"}, [(False, False), (True, False)]),
    ({"RECUR_START_FRAC": "0.95", "LATE_QAT_FRAC": "0.1"}, [(False, False), (False, True), (True, True)]),
])
def test_the_warm_up_compiles_each_switch_state_the_run_passes_through(env, states):
    cfg, _ = T.config_from_env(env)
    assert [state for _, state in T.warmup_plan(cfg)] == states


def test_recurrence_must_switch_on_before_the_end():
    with pytest.raises(T.RunError, match="RECUR_START_FRAC must be < 1"):
        T.config_from_env({"RECUR_START_FRAC": "1"})

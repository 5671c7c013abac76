"""data/download.py against a real HTTP server on 127.0.0.1 serving a fake Hub layout; data/build_shards.py round trips."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

import train_gpt as T
from helpers import parse_log, ROOT, BOS, make_dataset, run_script, script_env

DOWNLOAD = ROOT / "data" / "download.py"
BUILD = ROOT / "data" / "build_shards.py"
REPO = "willdepueoai/parameter-golf"


def load_tool(path: Path):
    name = f"_tool_{path.stem}"          # a private name: "download" could shadow a real package
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod              # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


dl = load_tool(DOWNLOAD)
bs = load_tool(BUILD)


# ==================================================================================================
# A fake Hugging Face Hub: GET /datasets/<repo>/resolve/main/<path> with Range support, and knobs to misbehave
# ==================================================================================================

class FakeHub:
    """files: {path in repo: bytes}. cut: {path: times} drops that many transfers halfway. Records every request."""

    def __init__(self, files: dict[str, bytes], repo: str = REPO) -> None:
        self.files, self.repo = dict(files), repo
        self.cut: dict[str, int] = {}
        self.honor_range = True
        self.requests: list[tuple[str, str | None]] = []   # (path in repo, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_GET(self):
                prefix = f"/datasets/{hub.repo}/resolve/main/"
                path = self.path[len(prefix):] if self.path.startswith(prefix) else None
                hub.requests.append((path, self.headers.get("Range")))
                if path not in hub.files:
                    self.send_error(404)
                    return
                data, start = hub.files[path], 0
                rng = self.headers.get("Range")
                if rng and hub.honor_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if hub.cut.get(path, 0) > 0:   # announce the whole body, send half, hang up
                    hub.cut[path] -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, path: str) -> list[str | None]:
        """The Range headers of the requests for one file."""
        return [r for p, r in self.requests if p == path]


def hub_files(root: Path, variant: str = "sp1024", n_train: int = 3) -> dict[str, bytes]:
    """A tiny export in the official layout (made by tests/helpers.py), keyed by path in the dataset repo."""
    data, model = make_dataset(root, n_train_docs=300 * n_train)
    name = f"fineweb10B_{variant}"
    toks = np.fromfile(data / "fineweb_train_000000.bin", dtype="<u2", offset=1024).tolist() + \
        np.fromfile(data / "fineweb_train_000001.bin", dtype="<u2", offset=1024).tolist()
    files = {"datasets/tokenizers/fineweb_1024_bpe.model": model.read_bytes(),
             "datasets/tokenizers/fineweb_1024_bpe.vocab": model.with_suffix(".vocab").read_bytes(),
             f"datasets/datasets/{name}/fineweb_val_000000.bin": (data / "fineweb_val_000000.bin").read_bytes()}
    per = len(toks) // n_train
    for i in range(n_train):
        shard = np.asarray(toks[i * per:(i + 1) * per], dtype="<u2")
        header = np.zeros(256, dtype="<i4")
        header[:3] = (20240520, 1, len(shard))
        files[f"datasets/datasets/{name}/fineweb_train_{i:06d}.bin"] = header.tobytes() + shard.tobytes()
    manifest = {"datasets": [{"name": name, "tokenizer_name": "sp_bpe_1024",
                              "stats": {"files_train": n_train, "files_val": 1}}],
                "tokenizers": [{"name": "sp_bpe_1024", "model_path": "tokenizers/fineweb_1024_bpe.model",
                                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}]}
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return hub_files(tmp_path_factory.mktemp("export"))


@pytest.fixture
def hub(export, monkeypatch):
    with FakeHub(export) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def local(out: Path, path_in_repo: str) -> Path:
    return out / path_in_repo.removeprefix("datasets/")


def fetch(out: Path, *flags: str) -> int:
    return dl.main(["--variant", "sp1024", "--out", str(out), "--retries", "1", "--timeout", "5", *flags])


# ==================================================================================================
# Downloader
# ==================================================================================================

def test_download_fetches_layout_train_gpt_expects(hub, export, tmp_path, capsys):
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "2") == 0
    wanted = [p for p in export if "train_000002" not in p]
    for path in wanted:
        assert local(out, path).read_bytes() == export[path], path
    assert not local(out, "datasets/datasets/fineweb10B_sp1024/fineweb_train_000002.bin").exists()
    assert not list(out.rglob("*.part"))
    # the default paths of train_gpt.py's Config, relative to the folder holding data/
    assert (tmp_path / T.Config.data_path / "fineweb_val_000000.bin").is_file()
    assert (tmp_path / T.Config.tokenizer_path).is_file()
    cap = capsys.readouterr()
    assert f"DATA_PATH={out}/datasets/fineweb10B_sp1024 TOKENIZER_PATH={out}/tokenizers/fineweb_1024_bpe.model" in cap.out
    assert f"[{len(wanted) - 1}/{len(wanted) - 1}] datasets/fineweb10B_sp1024/fineweb_train_000001.bin" in cap.err  # progress


def test_whole_part_file_is_finished_without_refetching(hub, export, tmp_path):
    """Killed after the last byte but before the rename: the server answers 416 and the .part is kept."""
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    part = local(tmp_path / "data", path).with_name("fineweb_val_000000.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(export[path])
    assert fetch(tmp_path / "data", "--train-shards", "0") == 0
    assert hub.fetched(path) == [f"bytes={len(export[path])}-", "bytes=0-0"]
    assert local(tmp_path / "data", path).read_bytes() == export[path] and not part.exists()


def test_rerun_skips_complete_files_without_network(hub, tmp_path):
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "1") == 0
    hub.requests.clear()
    assert fetch(out, "--train-shards", "1") == 0
    assert hub.requests == []   # manifest and every file were already complete
    assert fetch(out, "--train-shards", "2") == 0
    assert [p for p, _ in hub.requests] == ["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]


def test_interrupted_transfer_resumes_with_range(hub, export, tmp_path):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    hub.cut[path] = 1
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "2") == 0
    assert hub.fetched(path) == [None, f"bytes={len(export[path]) // 2}-"]
    assert local(out, path).read_bytes() == export[path]


def test_resume_across_runs_after_giving_up(hub, export, tmp_path, capsys):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    hub.cut[path] = 2          # both attempts of the first run are cut
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "1") == 1
    err = capsys.readouterr().err
    assert "connection dropped" in err and "rerun the same command to resume" in err
    part = local(out, path).with_name("fineweb_train_000000.bin.part")
    assert not local(out, path).exists() and part.stat().st_size > 0
    kept = part.stat().st_size
    assert export[path].startswith(part.read_bytes())
    hub.requests.clear()
    assert fetch(out, "--train-shards", "1") == 0
    assert hub.fetched(path) == [f"bytes={kept}-"]
    assert local(out, path).read_bytes() == export[path] and not part.exists()


def test_server_ignoring_range_restarts_the_file(hub, export, tmp_path):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    part = local(tmp_path / "data", path).with_name("fineweb_val_000000.bin.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes from another file")
    hub.honor_range = False
    assert fetch(tmp_path / "data", "--train-shards", "0") == 0
    assert local(tmp_path / "data", path).read_bytes() == export[path]


def test_corrupt_shard_fails_and_leaves_nothing(hub, export, tmp_path, capsys):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    bad = bytearray(export[path])
    bad[0:4] = (1234).to_bytes(4, "little")
    hub.files[path] = bytes(bad)
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "1") == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000000.bin" in err and "corrupt" in err and "magic 1234" in err
    assert not local(out, path).exists() and not list(out.rglob("*.part"))


def test_truncated_shard_fails_on_header_size_check(hub, export, tmp_path, capsys):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    hub.files[path] = export[path][:-10]       # the server sends a short file (consistent Content-Length)
    assert fetch(tmp_path / "data", "--train-shards", "0") == 1
    assert "header says" in capsys.readouterr().err


def test_damaged_local_shard_is_fetched_again(hub, export, tmp_path):
    out = tmp_path / "data"
    assert fetch(out, "--train-shards", "1") == 0
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    local(out, path).write_bytes(export[path][:3000])
    hub.requests.clear()
    assert fetch(out, "--train-shards", "1") == 0
    assert [p for p, _ in hub.requests] == [path]
    assert local(out, path).read_bytes() == export[path]


def test_missing_file_is_a_clear_error(hub, tmp_path, capsys):
    del hub.files["datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin"]
    assert fetch(tmp_path / "data", "--train-shards", "2") == 1
    err = capsys.readouterr().err
    assert "fineweb_train_000001.bin: not found (HTTP 404)" in err


def test_unreachable_network_is_a_clear_error(tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    r = subprocess.run([sys.executable, str(DOWNLOAD), "--out", str(tmp_path / "data"), "--retries", "0"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot reach") and f"127.0.0.1:{port}" in r.stderr
    assert "manifest.json" in r.stderr


def test_unknown_host_is_not_retried(tmp_path):
    try:   # .invalid never resolves (RFC 2606); a machine without a resolver says "try again" instead
        socket.getaddrinfo("hub.invalid", 80)
        pytest.skip("hub.invalid resolves here")
    except socket.gaierror as e:
        if e.errno != socket.EAI_NONAME:
            pytest.skip(f"this resolver answers {e}, a transient error that is retried")
    env = {**os.environ, "HF_ENDPOINT": "http://hub.invalid"}
    r = subprocess.run([sys.executable, str(DOWNLOAD), "--out", str(tmp_path / "data"), "--retries", "5"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "retrying" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: cannot reach http://hub.invalid/") and "no network?" in r.stderr


def test_variant_and_shard_count_are_checked_against_manifest(hub, tmp_path, capsys):
    assert dl.main(["--variant", "sp4096", "--out", str(tmp_path / "d")]) == 1
    assert "no dataset fineweb10B_sp4096; available: sp1024" in capsys.readouterr().err
    assert fetch(tmp_path / "d", "--train-shards", "4") == 1
    assert "has only 3 train shards" in capsys.readouterr().err


def test_repo_id_override(export, tmp_path, monkeypatch):
    with FakeHub(export, repo="someone/other-export") as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        assert fetch(tmp_path / "d", "--train-shards", "1") == 1          # the default repo is not there
        assert fetch(tmp_path / "d", "--train-shards", "1", "--repo-id", "someone/other-export") == 0
    assert (tmp_path / "d/datasets/fineweb10B_sp1024/fineweb_train_000000.bin").is_file()


def test_manifest_paths_cannot_escape_output(hub, tmp_path, capsys):
    m = json.loads(hub.files["datasets/manifest.json"])
    m["tokenizers"][0]["model_path"] = "../../evil.model"
    hub.files["datasets/manifest.json"] = json.dumps(m).encode()
    assert fetch(tmp_path / "d", "--train-shards", "0") == 1
    assert "not a relative path inside the export" in capsys.readouterr().err


# ==================================================================================================
# Shard builder
# ==================================================================================================

ASCII_DOCS = ["Hello world. This is the first document.", "A second one, with numbers 12345 and punctuation!",
              "the of and to in is was for on that with as by at from"]


@pytest.fixture(scope="module")
def tokenizer(tiny_data):
    return tiny_data[1]


def read_split(folder: Path, split: str, vocab: int = 320) -> tuple[list[np.ndarray], np.ndarray]:
    files = T.shard_files(str(folder), split)
    shards = [T.read_shard(f, vocab) for f in files]        # train_gpt.py's own header/size/vocab checks
    return shards, np.concatenate(shards).astype(np.int64)


def split_docs(tokens: np.ndarray) -> list[list[int]]:
    starts = np.flatnonzero(tokens == BOS)
    assert starts[0] == 0, "a split must start with BOS"
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, list(starts[1:]) + [len(tokens)])]


def build(*args) -> int:
    return bs.main([str(a) for a in args])


def test_builder_round_trip_jsonl(tokenizer, tmp_path):
    import sentencepiece as spm
    from helpers import make_documents
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    docs = ASCII_DOCS + make_documents(60, seed=7)     # the made-up docs include non-ASCII words
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    out = tmp_path / "shards"
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 5, "--shard-tokens", 300) == 0
    val_shards, val = read_split(out, "val")
    train_shards, train = read_split(out, "train")
    # the stream is cut at exactly --shard-tokens, documents continue across shards
    assert [len(s) for s in train_shards[:-1]] == [300] * (len(train_shards) - 1) and len(train_shards) > 2
    assert 0 < len(train_shards[-1]) <= 300
    got = split_docs(val) + split_docs(train)
    assert len(split_docs(val)) == 5 and len(got) == len(docs)
    assert got == sp.encode(docs)                      # BOS before every document, in input order, nothing else
    decoded = [sp.decode(ids) for ids in got]
    assert decoded[:3] == ASCII_DOCS                   # plain ASCII survives exactly
    assert decoded == [sp.decode(sp.encode(d)) for d in docs]
    for f in out.glob("fineweb_*.bin"):
        header = np.fromfile(f, dtype="<i4", count=256)
        assert header[:3].tolist() == [20240520, 1, (f.stat().st_size - 1024) // 2] and not header[3:].any()
    info = json.loads((out / "build_info.json").read_text())
    assert info["val"]["docs"] == 5 and info["train"]["docs"] == len(docs) - 5
    assert info["train"]["tokens"] == len(train) and info["val"]["tokens"] == len(val)
    assert not list(tmp_path.glob(".shards*"))         # no temp folder left


@pytest.mark.parametrize("mode,expected", [
    ("paragraph", ["Hello world.\nStill the first document.", "Second paragraph.", "Third."]),
    ("line", ["Hello world.", "Still the first document.", "Second paragraph.", "Third."]),
    ("file", ["Hello world.\nStill the first document.\n\nSecond paragraph.\n\n\nThird."]),
])
def test_builder_plain_text_documents(tokenizer, tmp_path, mode, expected):
    src = tmp_path / "a.txt"
    src.write_text("Hello world.\nStill the first document.\n\nSecond paragraph.\n\n\nThird.", encoding="utf-8")
    docs = list(bs.read_documents([src], "text", mode))
    assert docs == expected
    if len(docs) > 1:
        assert build(src, "--tokenizer", tokenizer, "--out", tmp_path / "o", "--val-docs", 1, "--plain-docs", mode) == 0
        assert len(split_docs(read_split(tmp_path / "o", "train")[1])) == len(docs) - 1


def test_builder_val_fraction_and_folder_input(tokenizer, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"part{i}.jsonl").write_text("".join(json.dumps({"text": f"doc {i} {j}"}) + "\n"
                                                                for j in range(25)))
    assert build(tmp_path / "in", "--tokenizer", tokenizer, "--out", tmp_path / "o", "--val-fraction", 0.1) == 0
    info = json.loads((tmp_path / "o/build_info.json").read_text())
    assert (info["val"]["docs"], info["train"]["docs"]) == (10, 90)


def test_builder_errors(tokenizer, tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": d}) + "\n" for d in ASCII_DOCS))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text(json.dumps({"body": "x"}) + "\n")
    cases = [
        ([bad, "--tokenizer", tokenizer, "--out", tmp_path / "o1"], "bad.jsonl:2: not valid JSON"),
        ([nofield, "--tokenizer", tokenizer, "--out", tmp_path / "o2"], "nofield.jsonl:1: expected an object with a string field 'text'"),
        ([good, "--tokenizer", tokenizer, "--out", tmp_path / "o3", "--val-docs", 3], "leave none for training"),
        ([tmp_path / "nope.txt", "--tokenizer", tokenizer, "--out", tmp_path / "o4"], "nope.txt: no such file or folder"),
        ([good, "--tokenizer", tmp_path / "x.model", "--out", tmp_path / "o5"], "x.model: file not found"),
        ([good, "--tokenizer", tokenizer, "--out", tmp_path / "o6", "--shard-tokens", 0], "--shard-tokens 0 must be > 0"),
    ]
    for argv, message in cases:
        assert build(*argv) == 1, message
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]   # nothing half-written


def test_builder_refuses_existing_output_and_tokenizer_without_bos(tokenizer, tmp_path, capsys):
    import sentencepiece as spm
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in ASCII_DOCS))
    out = tmp_path / "o"
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 1) == 0
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 1) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    (out / "marker").write_text("old")
    assert build(src, "--tokenizer", tokenizer, "--out", out, "--val-docs", 2, "--force") == 0
    assert not (out / "marker").exists() and json.loads((out / "build_info.json").read_text())["val"]["docs"] == 2
    spm.SentencePieceTrainer.train(sentence_iterator=iter(ASCII_DOCS * 20), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=60, bos_id=-1, eos_id=1, unk_id=0, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False)
    assert build(src, "--tokenizer", tmp_path / "nobos.model", "--out", tmp_path / "o7") == 1
    assert "BOS id is -1" in capsys.readouterr().err


def test_train_gpt_trains_on_built_shards(tokenizer, tmp_path):
    """The pipeline on your own data: text -> build_shards.py -> train_gpt.py (tiny model, CPU)."""
    from helpers import make_documents
    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(700, seed=11)), encoding="utf-8")
    r = subprocess.run([sys.executable, str(BUILD), str(src), "--tokenizer", str(tokenizer), "--out",
                        str(tmp_path / "shards"), "--val-docs", "100", "--shard-tokens", "8000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"DATA_PATH={tmp_path / 'shards'}" in r.stdout
    env = script_env(tmp_path / "shards", tokenizer, tmp_path / "logs", RUN_ID="own", ITERATIONS="2")
    run = run_script(env, tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    final = parse_log(tmp_path / "logs/own.txt")["final_slot_ttt_exact"]   # the log body, not the source block above it
    assert int(final["scored_tokens"]) > 0 and float(final["val_bpb"]) > 0

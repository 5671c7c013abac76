"""data/download.py: the real huggingface_hub against a fake Hub on 127.0.0.1 that answers as the Hub does."""
from __future__ import annotations

import hashlib
import os
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from helpers import ROOT, make_dataset, write_shard

DOWNLOAD = ROOT / "data" / "download.py"
OFFICIAL = "willdepueoai/parameter-golf"      # sp1024
KEVCLARK = "kevclark/parameter-golf"          # sp4096, sp8192


# ==================================================================================================
# A fake Hub: the resolve endpoint of dataset repos, with shards served like LFS files from a second origin (the CDN)
# ==================================================================================================

class FakeHub:
    """repos: {repo id: {path in repo: bytes}}. Records every request as (method, server, repo, path, Authorization).

    What hf_hub_download needs from HEAD/GET /datasets/<repo>/resolve/<revision>/<path>: X-Repo-Commit and an ETag on
    every answer; for LFS files (our .bin shards) a 302 to the CDN with X-Linked-Etag and X-Linked-Size, the CDN being
    another origin as on the real Hub; 404s typed by X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound).
    While open, the environment points every Hub tool at it: HF_ENDPOINT, a private HF_HOME (cache, token), Xet and
    progress bars off, and no HF_* setting of the developer's (HF_TOKEN included)."""

    def __init__(self, files: dict[str, bytes] | None = None, repo: str = OFFICIAL) -> None:
        self.repos = {repo: dict(files)} if files is not None else {}
        self.versions: dict[str, int] = {}
        self.requests: list[tuple[str, str, str, str, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep pytest output clean
                pass

            def do_HEAD(self):
                hub.answer(self, body=False)

            def do_GET(self):
                hub.answer(self, body=True)

        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.url, self.cdn = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self.threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
                        for s in self.servers]

    def commit(self, repo: str) -> str:
        return hashlib.sha1(f"{repo}@{self.versions.get(repo, 0)}".encode()).hexdigest()

    def update(self, repo: str, path: str, data: bytes | None) -> None:
        """A new commit that changes (or, with None, deletes) one file."""
        if data is None:
            del self.repos[repo][path]
        else:
            self.repos[repo][path] = data
        self.versions[repo] = self.versions.get(repo, 0) + 1

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        parts = urllib.parse.unquote(urllib.parse.urlsplit(h.path).path).split("/")
        auth = h.headers.get("Authorization")
        if h.server is self.servers[1]:                       # the CDN: /cdn/<repo>/<sha256>
            repo = "/".join(parts[2:4])
            found = [(p, d) for p, d in self.repos.get(repo, {}).items() if hashlib.sha256(d).hexdigest() == parts[-1]]
            path, data = found[0] if found else ("", b"")
            self.requests.append((h.command, "cdn", repo, path, auth))
            return self.send(h, 200 if found else 404, {}, data, body)
        repo, path = "/".join(parts[2:4]), "/".join(parts[6:])
        self.requests.append((h.command, "hub", repo, path, auth))
        if parts[1:2] != ["datasets"] or parts[4:5] != ["resolve"] or repo not in self.repos:
            return self.send(h, 404, {"X-Error-Code": "RepoNotFound"}, b"", body)
        commit = self.commit(repo)
        if parts[5] not in ("main", commit):
            return self.send(h, 404, {"X-Error-Code": "RevisionNotFound"}, b"", body)
        if path not in self.repos[repo]:
            return self.send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, b"", body)
        data = self.repos[repo][path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}
        if path.endswith(".bin"):                             # LFS: the metadata rides on the redirect
            sha = hashlib.sha256(data).hexdigest()
            headers.update({"Location": f"{self.cdn}/cdn/{repo}/{sha}", "X-Linked-Etag": f'"{sha}"',
                            "X-Linked-Size": str(len(data))})
            return self.send(h, 302, headers, b"", body)
        self.send(h, 200, headers, data, body)

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, headers: dict[str, str], data: bytes, body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def fetched(self, method: str = "GET") -> list[tuple[str, str]]:
        """(repo, path) of the requests of one method."""
        return [(r, p) for m, _, r, p, _ in self.requests if m == method]

    def __enter__(self) -> "FakeHub":
        for t in self.threads:
            t.start()
        self.saved_env = dict(os.environ)
        self.home = tempfile.mkdtemp(prefix="fakehub-hf-home-")
        for key in [k for k in os.environ if k.startswith(("HF_", "HUGGINGFACE_"))]:
            del os.environ[key]
        os.environ.update({"HF_ENDPOINT": self.url, "HF_HOME": self.home, "HF_HUB_DISABLE_XET": "1",
                           "HF_HUB_ENABLE_HF_TRANSFER": "0", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                           "HF_HUB_DISABLE_TELEMETRY": "1"})
        return self

    def __exit__(self, *exc) -> None:
        os.environ.clear()
        os.environ.update(self.saved_env)
        shutil.rmtree(self.home, ignore_errors=True)
        for s in self.servers:
            s.shutdown()
            s.server_close()


def hub_files(root: Path, variants: tuple[str, ...] = ("sp1024",), n_train: int = 3) -> dict[str, bytes]:
    """A tiny export in the official layout (made by tests/helpers.py), keyed by path in the dataset repo. The
    tokenizer is the tiny one of every variant (VOCAB_SIZE 320): the downloader never reads it."""
    data, model = make_dataset(root, n_train_docs=300 * n_train)
    train = np.concatenate([np.fromfile(data / f"fineweb_train_00000{i}.bin", dtype="<u2", offset=1024) for i in (0, 1)])
    per = len(train) // n_train
    shards = {"fineweb_val_000000.bin": (data / "fineweb_val_000000.bin").read_bytes()}
    for i in range(n_train):
        shard = write_shard(root / "split" / f"{i}.bin", train[i * per:(i + 1) * per])
        shards[f"fineweb_train_{i:06d}.bin"] = shard.read_bytes()
    files, manifest = {}, {"datasets": [], "tokenizers": []}
    for variant in variants:
        v, name = variant.removeprefix("sp"), f"fineweb10B_{variant}"
        for suffix in ("model", "vocab"):
            files[f"datasets/tokenizers/fineweb_{v}_bpe.{suffix}"] = model.with_suffix(f".{suffix}").read_bytes()
        files.update({f"datasets/datasets/{name}/{f}": b for f, b in shards.items()})
        manifest["datasets"].append({"name": name, "tokenizer_name": f"sp_bpe_{v}",
                                     "stats": {"files_train": n_train, "files_val": 1}})
        manifest["tokenizers"].append({"name": f"sp_bpe_{v}", "model_path": f"tokenizers/fineweb_{v}_bpe.model",
                                       "vocab_path": f"tokenizers/fineweb_{v}_bpe.vocab"})
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    official = hub_files(root)
    kev = hub_files(root / "kev", ("sp4096", "sp8192"))
    return {OFFICIAL: official, KEVCLARK: kev}


@pytest.fixture
def hub(exports):
    with FakeHub() as h:
        h.repos = {repo: dict(files) for repo, files in exports.items()}
        yield h


def download(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """python data/download.py in cwd, so that --out defaults to cwd/data as on the competition machine."""
    return subprocess.run([sys.executable, str(DOWNLOAD), *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The last line of stderr (progress lines may come before it), the only one that speaks of an error."""
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1, r.stderr
    return lines[-1]


def finished_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ==================================================================================================
# Tests
# ==================================================================================================

@pytest.mark.parametrize("variant,repo", [("sp1024", OFFICIAL), ("sp4096", KEVCLARK), ("sp8192", KEVCLARK)])
def test_variant_picks_its_repo_and_places_files_where_train_gpt_looks(hub, exports, tmp_path, variant, repo):
    r = download(tmp_path, "--variant", variant, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    v = variant.removeprefix("sp")
    # train_gpt.py's defaults for VOCAB_SIZE=V: DATA_PATH=./data/datasets/fineweb10B_spV,
    # TOKENIZER_PATH=./data/tokenizers/fineweb_V_bpe.model
    data, tok = f"data/datasets/fineweb10B_{variant}", f"data/tokenizers/fineweb_{v}_bpe.model"
    wanted = {f"{data}/fineweb_val_000000.bin", f"{data}/fineweb_train_000000.bin", f"{data}/fineweb_train_000001.bin",
              tok, tok.replace(".model", ".vocab")}
    assert finished_files(tmp_path / "data") == {w.removeprefix("data/") for w in wanted}   # nothing else, no temp
    for w in wanted:
        assert (tmp_path / w).read_bytes() == exports[repo]["datasets/" + w.removeprefix("data/")], w
    asked = {"datasets/" + w.removeprefix("data/") for w in wanted} | {"datasets/manifest.json"}
    assert sorted(hub.fetched("HEAD")) == sorted((repo, path) for path in asked)
    assert f"VOCAB_SIZE={v} DATA_PATH={data} TOKENIZER_PATH={tok}" in r.stdout
    assert f"[5/5] datasets/fineweb10B_{variant}/fineweb_train_000001.bin downloaded" in r.stderr
    assert all(auth is None for *_, auth in hub.requests)          # no HF_TOKEN, no Authorization


def test_repo_id_overrides_the_variant_default(hub, exports, tmp_path):
    hub.repos["someone/mirror"] = hub.repos.pop(KEVCLARK)
    assert "dataset repo kevclark/parameter-golf not found" in one_line_error(download(tmp_path, "--variant", "sp8192"))
    r = download(tmp_path, "--variant", "sp8192", "--repo-id", "someone/mirror", "--train-shards", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data/datasets/fineweb10B_sp8192/fineweb_train_000000.bin").is_file()
    assert {rp for rp, _ in hub.fetched("GET")} == {"someone/mirror"}


def test_stale_manifest_of_another_variant_is_never_reused(hub, exports, tmp_path):
    """The official script keeps data/manifest.json and reuses it (the sp8192 records say: delete it by hand)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data/manifest.json").write_bytes(exports[OFFICIAL]["datasets/manifest.json"])   # lists sp1024 only
    for variant in ("sp1024", "sp8192"):            # one HF cache for both: each repo's manifest is its own
        r = download(tmp_path, "--variant", variant, "--train-shards", "3")
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "data/tokenizers/fineweb_8192_bpe.model").is_file()
    # a new commit of the same repo: its manifest now lists a 4th train shard, and the next run sees it
    m = json.loads(hub.repos[KEVCLARK]["datasets/manifest.json"])
    m["datasets"][1]["stats"]["files_train"] = 4
    hub.update(KEVCLARK, "datasets/manifest.json", json.dumps(m).encode())
    shard = write_shard(tmp_path / "new.bin", np.arange(100)).read_bytes()
    hub.update(KEVCLARK, "datasets/datasets/fineweb10B_sp8192/fineweb_train_000003.bin", shard)
    hub.requests.clear()
    r = download(tmp_path, "--variant", "sp8192", "--train-shards", "4")
    assert r.returncode == 0, r.stderr
    assert hub.fetched("GET") == [(KEVCLARK, "datasets/manifest.json"),
                                  (KEVCLARK, "datasets/datasets/fineweb10B_sp8192/fineweb_train_000003.bin")]


@pytest.mark.parametrize("damage,message", [("magic", "bad header (magic 1234, version 1"),
                                            ("size", "header says")])
def test_corrupt_shard_is_a_one_line_error_and_leaves_nothing_finished(hub, exports, tmp_path, damage, message):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    good = exports[OFFICIAL][path]
    bad = (1234).to_bytes(4, "little") + good[4:] if damage == "magic" else good[:-10]   # short: sent consistently
    hub.update(OFFICIAL, path, bad)
    err = one_line_error(download(tmp_path, "--train-shards", "1"))
    assert f"{OFFICIAL}:{path}: the downloaded shard is corrupt: {message}" in err
    assert hub.fetched("GET").count((OFFICIAL, path)) == 2         # a bad cached copy gets one forced download
    assert not list((tmp_path / "data/datasets").rglob("fineweb_train_*"))
    assert not [p for p in Path(os.environ["HF_HOME"]).rglob("*") if p.is_file() and p.read_bytes() == bad]


def test_hf_token_is_sent_as_authorization(hub, tmp_path):
    r = download(tmp_path, "--train-shards", "1", HF_TOKEN="hf_fake_token")
    assert r.returncode == 0, r.stderr
    resolves = [auth for _, server, *_, auth in hub.requests if server == "hub"]
    assert resolves and set(resolves) == {"Bearer hf_fake_token"}


def test_errors_are_one_line_naming_the_file_or_value(hub, tmp_path):
    val = "datasets/datasets/fineweb10B_sp1024/fineweb_val_000000.bin"
    hub.update(OFFICIAL, val, None)
    cases = [
        (["--variant", "sp2048"], "--variant sp2048: unknown; known: sp1024, sp4096, sp8192"),
        (["--variant", "sp2048", "--repo-id", KEVCLARK], "lists no dataset fineweb10B_sp2048; available: sp4096, sp8192"),
        (["--variant", "../x"], "--variant '../x': expected a name such as sp8192"),
        (["--train-shards", "4"], "--train-shards 4: fineweb10B_sp1024 has only 3 train shards"),
        (["--train-shards", "-1"], "--train-shards -1 must be >= 0"),
        (["--repo-id", "nobody/nothing"], "nobody/nothing:datasets/manifest.json: dataset repo nobody/nothing not found"),
        (["--revision", "v9"], "revision 'v9' not found in willdepueoai/parameter-golf"),
        (["--train-shards", "1"], f"{OFFICIAL}:{val}: not found (HTTP 404)"),
    ]
    for args, message in cases:
        err = one_line_error(download(tmp_path, *args))
        assert message in err, (args, err)
    err = one_line_error(download(tmp_path, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty")))   # nothing to use
    assert f"{OFFICIAL}:datasets/manifest.json: not in the Hub cache" in err
    m = json.loads(hub.repos[KEVCLARK]["datasets/manifest.json"])
    m["tokenizers"][1]["model_path"] = "../../evil.model"
    hub.update(KEVCLARK, "datasets/manifest.json", json.dumps(m).encode())
    err = one_line_error(download(tmp_path, "--variant", "sp8192"))
    assert "manifest path '../../evil.model' is not a relative path inside the export" in err
    assert not list(tmp_path.rglob("*.bin"))


def test_rerun_skips_finished_files(hub, exports, tmp_path):
    assert download(tmp_path, "--train-shards", "1").returncode == 0
    hub.requests.clear()
    r = download(tmp_path, "--train-shards", "1")
    assert r.returncode == 0 and "(0 downloaded, 4 already complete)" in r.stdout, r.stdout + r.stderr
    assert hub.fetched("GET") == [] and hub.fetched("HEAD") == [(OFFICIAL, "datasets/manifest.json")]
    r = download(tmp_path, "--train-shards", "1", HF_HUB_OFFLINE="1")     # finished files need no network at all
    assert r.returncode == 0, r.stderr
    hub.requests.clear()
    assert download(tmp_path, "--train-shards", "2").returncode == 0
    assert hub.fetched("GET") == [(OFFICIAL, "datasets/datasets/fineweb10B_sp1024/fineweb_train_000001.bin")]
    # a damaged shard is fetched again (in place: a hard link damages the cached copy too)
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    with open(tmp_path / "data" / path.removeprefix("datasets/"), "r+b") as f:
        f.truncate(3000)
    r = download(tmp_path, "--train-shards", "2")
    assert r.returncode == 0, r.stderr
    assert "header says" in r.stderr and "downloading it again" in r.stderr
    assert (tmp_path / "data" / path.removeprefix("datasets/")).read_bytes() == exports[OFFICIAL][path]


def test_files_are_hard_links_into_the_cache_or_copies_with_a_note(hub, exports, tmp_path):
    path = "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    shard = tmp_path / "data" / path.removeprefix("datasets/")
    assert download(tmp_path, "--train-shards", "1").returncode == 0
    assert shard.stat().st_nlink == 2                        # one copy on disk: the Hub cache's blob is the same file
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system to hold the Hub cache")
    shutil.rmtree(tmp_path / "data")
    with tempfile.TemporaryDirectory(dir=other) as home:
        r = download(tmp_path, "--train-shards", "1", HF_HOME=home)
    assert r.returncode == 0, r.stderr
    assert "so 4 files were copied and take twice the space; HF_HUB_CACHE=data/.hub-cache keeps one copy" in r.stderr
    assert shard.stat().st_nlink == 1 and shard.read_bytes() == exports[OFFICIAL][path]


# ==================================================================================================
# The CaseOps variant: its own repo and folder names, and the val byte sidecar as part of the data
# ==================================================================================================

ROMEERP = "romeerp/parameter-golf-caseops-v1"
CASEOPS_NAME = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
CASEOPS_TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"


def caseops_files(root: Path, sidecar: list[int] | None = None) -> dict[str, bytes]:
    """A tiny export laid out as romeerp/parameter-golf-caseops-v1 (the #1729 exporter's manifest: the dataset
    entry names a val_bytes_glob; one sidecar per val shard). The tokenizer is placeholder bytes: never read."""
    val = [1, 9, 4, 10, 11, 1, 12, 5, 13]                        # two documents; 4, 5 are operators (0 bytes)
    side = [0, 2, 0, 3, 1, 0, 4, 0, 2] if sidecar is None else sidecar
    prefix = f"datasets/datasets/{CASEOPS_NAME}"
    files = {f"{prefix}/fineweb_val_000000.bin": write_shard(root / "val.bin", val).read_bytes(),
             f"{prefix}/fineweb_val_bytes_000000.bin": write_shard(root / "side.bin", side).read_bytes(),
             f"datasets/{CASEOPS_TOKENIZER}.model": b"caseops model", f"datasets/{CASEOPS_TOKENIZER}.vocab": b"vocab"}
    for i in range(2):
        files[f"{prefix}/fineweb_train_{i:06d}.bin"] = write_shard(root / f"t{i}.bin", np.arange(1, 50 + i)).read_bytes()
    tok = "sp_bpe_8192_lossless_caps_caseops_v1_reserved"
    manifest = {"datasets": [{"name": CASEOPS_NAME, "tokenizer_name": tok, "stats": {"files_train": 2, "files_val": 1},
                              "val_bytes_glob": f"datasets/{CASEOPS_NAME}/fineweb_val_bytes_*.bin"}],
                "tokenizers": [{"name": tok, "model_path": f"{CASEOPS_TOKENIZER}.model",
                                "vocab_path": f"{CASEOPS_TOKENIZER}.vocab", "text_transform": "lossless_caps_caseops_v1"}]}
    files["datasets/manifest.json"] = json.dumps(manifest).encode()
    return files


def test_caseops_variant_lands_where_a_caseops_run_looks_with_its_checked_sidecar(tmp_path):
    files = caseops_files(tmp_path)
    with FakeHub(files, repo=ROMEERP) as hub:
        r = download(tmp_path, "--variant", "sp8192_caseops", "--train-shards", "1")
        assert r.returncode == 0, r.stderr
        # train_gpt.py's defaults with its CaseOps setting on
        data, tok = f"data/datasets/{CASEOPS_NAME}", f"data/{CASEOPS_TOKENIZER}.model"
        wanted = {f"{data}/fineweb_val_000000.bin", f"{data}/fineweb_val_bytes_000000.bin",
                  f"{data}/fineweb_train_000000.bin", tok, tok.replace(".model", ".vocab")}
        assert finished_files(tmp_path / "data") == {w.removeprefix("data/") for w in wanted}
        for w in wanted:
            assert (tmp_path / w).read_bytes() == files["datasets/" + w.removeprefix("data/")], w
        assert f"VOCAB_SIZE=8192 DATA_PATH={data} TOKENIZER_PATH={tok}" in r.stdout
        side = f"datasets/datasets/{CASEOPS_NAME}/fineweb_val_bytes_000000.bin"   # its path in the repo
        bad = {"8 entries, but its val shard fineweb_val_000000.bin has 9 tokens": [0, 2, 0, 3, 1, 0, 4, 0],
               "3 bytes at token 5, a BOS of fineweb_val_000000.bin (it must count 0)": [0, 2, 0, 3, 1, 3, 4, 0, 2]}
        for i, (message, counts) in enumerate(bad.items()):
            hub.update(ROMEERP, side, write_shard(tmp_path / "bad.bin", counts).read_bytes())
            (tmp_path / f"fresh{i}").mkdir()                        # no finished files: the sidecar is downloaded
            err = one_line_error(download(tmp_path / f"fresh{i}", "--variant", "sp8192_caseops", "--train-shards", "0"))
            assert f"{ROMEERP}:{side}: not the byte sidecar of its val shard: {message}; deleted it" in err, err
            assert not (tmp_path / f"fresh{i}" / data / "fineweb_val_bytes_000000.bin").exists()
        hub.update(ROMEERP, side, None)
        err = one_line_error(download(tmp_path / "fresh0", "--variant", "sp8192_caseops", "--train-shards", "0"))
        assert f"{ROMEERP}:{side}: not found (HTTP 404)" in err

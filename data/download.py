"""Download the official cached FineWeb export (tokenizer + challenge shards) from the Hugging Face Hub.

    python data/download.py --variant sp1024 --train-shards 80

writes the layout train_gpt.py reads by default:

    data/manifest.json
    data/tokenizers/fineweb_1024_bpe.model (+ .vocab)
    data/datasets/fineweb10B_sp1024/fineweb_val_000000.bin ...     (validation: always all of it)
    data/datasets/fineweb10B_sp1024/fineweb_train_000000.bin ...   (the first --train-shards train shards)

The export is described by `datasets/manifest.json` in the dataset repo: `datasets[]` entries (name
`fineweb10B_<variant>`, `tokenizer_name`, `stats.files_train`, `stats.files_val`) and `tokenizers[]` entries
(`name`, `model_path` / `vocab_path` / `path`, relative to `datasets/`).

Each file goes to `<name>.part` and is renamed only when complete and verified (shards: header magic, version
and token count against the file size), so an interrupted run leaves no file that looks finished. Rerunning the
same command skips finished files and resumes `.part` files with an HTTP Range request. `HF_ENDPOINT` replaces
https://huggingface.co, as it does for huggingface_hub (tests point it at a local server). Standard library only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
REMOTE_ROOT = "datasets"              # the export lives under this folder of the dataset repo
DEFAULT_TRAIN_SHARDS = 80             # 8B tokens: more than one 600 s run on 8 x H100 can read
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
CHUNK_BYTES = 1 << 20


class DownloadError(Exception):
    """A problem the user must see: one line, exit code 1."""


class Retry(DownloadError):
    """A transient failure (dropped connection, timeout, 5xx): worth another attempt that resumes the .part file."""


# ==================================================================================================
# HTTP
# ==================================================================================================

def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def file_url(endpoint: str, repo_id: str, revision: str, path: str) -> str:
    return f"{endpoint}/datasets/{repo_id}/resolve/{urllib.parse.quote(revision, safe='')}/{urllib.parse.quote(path)}"


def open_url(url: str, offset: int, timeout: float):
    """GET url from byte `offset` on. Returns the response, or None when the server says the range is past the end."""
    headers = {"User-Agent": "parameter-golf-download/1.0"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416:
            return None
        if e.code == 404:
            raise DownloadError(f"{url}: not found (HTTP 404); check --repo-id, --variant and the manifest") from None
        if e.code in (401, 403):
            raise DownloadError(f"{url}: access denied (HTTP {e.code}); is the repo id right and the repo public?") from None
        if e.code == 429 or e.code >= 500:
            raise Retry(f"{url}: server error HTTP {e.code}") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME:   # no such host: retrying won't help
            raise DownloadError(f"cannot reach {url}: {reason} (no network? HF_ENDPOINT names a mirror)") from None
        raise Retry(f"cannot reach {url}: {reason}") from None


def content_range_total(header: str | None) -> int | None:
    """The total size in `Content-Range: bytes a-b/total` (or `bytes */total`), when the server gives one."""
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", header or "")
    return int(m.group(1)) if m else None


def fetch_once(url: str, part: Path, timeout: float, progress: "Progress") -> None:
    """One attempt: append to `part` from where it stops. Raises Retry when the transfer ends short."""
    offset = part.stat().st_size if part.exists() else 0
    resp = open_url(url, offset, timeout)
    if resp is None:   # 416: the .part is as long as the file (then it is whole) or longer (then start over)
        if not _part_is_whole(url, part, timeout):
            raise Retry(f"{url}: the server refused to resume at byte {offset}; starting this file over")
        progress.start_file(offset, offset)
        return
    with resp:
        total = None
        if resp.status == 206:
            m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise Retry(f"{url}: the server resumed at the wrong byte; starting this file over")
            total = content_range_total(resp.headers.get("Content-Range"))
        else:   # 200: a server that ignores Range sends the whole file, so start the .part over
            offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        progress.start_file(offset, total)
        size = offset
        with open(part, "ab" if offset else "wb") as f:
            try:
                while chunk := resp.read(CHUNK_BYTES):
                    f.write(chunk)
                    size += len(chunk)
                    progress.update(size)
            except (OSError, http.client.HTTPException) as e:
                raise Retry(f"{url}: connection dropped at byte {size}: {e}") from None
    if total is not None and size < total:
        raise Retry(f"{url}: connection dropped at byte {size} of {total}")
    if total is not None and size > total:
        part.unlink()
        raise DownloadError(f"{url}: received {size} bytes but the server announced {total}; deleted {part}")


def _part_is_whole(url: str, part: Path, timeout: float) -> bool:
    """After a 416, ask for the size with a 1-byte range: a .part of exactly that size is complete."""
    try:
        req = urllib.request.Request(url, headers={"Range": "bytes=0-0", "User-Agent": "parameter-golf-download/1.0"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            total = content_range_total(resp.headers.get("Content-Range")) if resp.status == 206 else \
                int(resp.headers.get("Content-Length", -1))
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False
    if part.stat().st_size == total:
        return True
    part.unlink()
    return False


# ==================================================================================================
# Verification and one file
# ==================================================================================================

def check_shard(path: Path) -> str | None:
    """Why `path` is not a whole challenge shard (256 x int32 header: magic, version, tokens; then uint16), or None."""
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return f"{size} bytes is shorter than the {HEADER_BYTES}-byte header"
    with open(path, "rb") as f:
        head = f.read(12)
    magic, version, count = (int.from_bytes(head[i:i + 4], "little", signed=True) for i in (0, 4, 8))
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        return f"bad header (magic {magic}, version {version}; expected {SHARD_MAGIC}, {SHARD_VERSION})"
    if count < 0 or size != HEADER_BYTES + 2 * count:
        return f"header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) but the file has {size} bytes"
    return None


def download(url: str, dest: Path, is_shard: bool, retries: int, timeout: float, progress: "Progress") -> str:
    """Make `dest` a complete, verified copy of url. Returns what happened: 'skipped', 'downloaded', 'resumed'."""
    if dest.exists():
        problem = check_shard(dest) if is_shard else None
        if problem is None:
            progress.skip()
            return "skipped"
        progress.note(f"{dest}: {problem}; downloading it again")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    for attempt in range(retries + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            fetch_once(url, part, timeout, progress)
            break
        except Retry as e:
            if attempt == retries:
                tries = f"{retries + 1} attempt{'s' if retries else ''}"
                if part.exists() and part.stat().st_size:
                    raise DownloadError(f"{e} (gave up after {tries}; {part.stat().st_size} bytes kept in {part}); "
                                        f"rerun the same command to resume") from None
                raise DownloadError(f"{e} (gave up after {tries}); rerun the same command when it is reachable") from None
            progress.note(f"{e}; retrying ({attempt + 1}/{retries})")
            grew = part.exists() and part.stat().st_size > before
            if not grew:   # no progress at all: give a struggling server a moment; a drop mid-file resumes at once
                time.sleep(min(2 ** attempt, 30))
    problem = check_shard(part) if is_shard else None
    if problem is not None:
        part.unlink()   # a corrupt file must not be resumed: the next run starts it over
        raise DownloadError(f"{url}: the downloaded shard is corrupt: {problem}; deleted it, rerun to fetch it again "
                            f"(if it fails again the file in the repo is bad)")
    os.replace(part, dest)
    progress.done()
    return "resumed" if resumed else "downloaded"


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


class Progress:
    """One status line per file on stderr: redrawn in place on a terminal, printed once per file in a log."""

    def __init__(self, n_files: int, stream=None) -> None:
        self.n, self.i, self.stream = n_files, 0, stream or sys.stderr
        self.tty = self.stream.isatty()
        self.name, self.t0, self.last, self.start, self.size, self.total = "", 0.0, 0.0, 0, 0, None

    def begin(self, name: str) -> None:
        self.i += 1
        self.name = name

    def start_file(self, offset: int, total: int | None) -> None:
        self.t0 = self.last = time.monotonic()
        self.start, self.size, self.total = offset, offset, total

    def update(self, size: int) -> None:
        self.size = size
        if self.tty and time.monotonic() - self.last > 0.2:
            self.last = time.monotonic()
            print("\r" + self.line() + "\033[K", end="", file=self.stream, flush=True)

    def line(self) -> str:
        total = f"/{human(self.total)}" if self.total else ""
        rate = (self.size - self.start) / max(time.monotonic() - self.t0, 1e-6)
        return f"[{self.i}/{self.n}] {self.name} {human(self.size)}{total} {human(rate)}/s"

    def done(self) -> None:
        end = " ok (resumed)" if self.start else " ok"
        print(("\r" + self.line() + end + "\033[K") if self.tty else self.line() + end, file=self.stream, flush=True)

    def skip(self) -> None:
        print(f"[{self.i}/{self.n}] {self.name} already complete", file=self.stream, flush=True)

    def note(self, msg: str) -> None:
        print(("\n" if self.tty else "") + msg, file=self.stream, flush=True)


# ==================================================================================================
# Manifest and plan
# ==================================================================================================

def safe_local(out: Path, rel: str) -> Path:
    """out/rel, refusing manifest paths that would escape the output folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DownloadError(f"manifest path {rel!r} is not a relative path inside the export")
    return out / p


def plan(manifest: dict, manifest_path: Path, variant: str, train_shards: int | None) -> list[str]:
    """Paths (relative to the export root) to fetch: tokenizer files, every val shard, the first N train shards."""
    datasets = {d.get("name"): d for d in manifest.get("datasets", []) if isinstance(d, dict)}
    name = f"fineweb10B_{variant}"
    if name not in datasets:
        known = sorted(n.removeprefix("fineweb10B_") for n in datasets if str(n).startswith("fineweb10B_"))
        raise DownloadError(f"--variant {variant}: {manifest_path} lists no dataset {name}; available: {', '.join(known) or 'none'}")
    entry = datasets[name]
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{manifest_path}: dataset {name} has no stats.files_train / stats.files_val") from None
    if train_shards is None:
        train_shards = min(DEFAULT_TRAIN_SHARDS, n_train)
    if train_shards > n_train:
        raise DownloadError(f"--train-shards {train_shards}: {name} has only {n_train} train shards")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"{manifest_path}: tokenizer {tok_name!r} of dataset {name} is not in its tokenizers list")
    tok_files = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not tok_files:
        raise DownloadError(f"{manifest_path}: tokenizer {tok_name!r} names no file (model_path / vocab_path / path)")
    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return tok_files + shards


def load_manifest(out: Path, url: str, args, progress: Progress) -> tuple[dict, Path]:
    """The local manifest when a previous run fetched it (the export is frozen), else a fresh download."""
    path = out / "manifest.json"
    if not path.exists() or args.refresh_manifest:
        path.unlink(missing_ok=True)
        progress.begin("manifest.json")
        download(url, path, False, args.retries, args.timeout, progress)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        path.unlink()
        raise DownloadError(f"{path} is not valid JSON ({e}); deleted it, rerun to fetch it again") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{path}: expected a JSON object")
    return manifest, path


# ==================================================================================================
# main
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python data/download.py --variant sp1024 --train-shards 80")
    p.add_argument("train_shards_pos", nargs="?", type=int, default=None, metavar="TRAIN_SHARDS",
                   help="same as --train-shards (the official script's positional form)")
    p.add_argument("--variant", default="sp1024",
                   help="tokenizer family: sp1024 (default) or any other the manifest lists (e.g. sp4096, sp8192)")
    p.add_argument("--train-shards", type=int, default=None,
                   help=f"number of train shards of 100M tokens to fetch, a prefix of the frozen shuffled export "
                        f"(default: {DEFAULT_TRAIN_SHARDS}, or all if fewer); validation is always fetched in full")
    p.add_argument("--out", type=Path, default=Path("data"),
                   help="output folder (default ./data: the layout train_gpt.py reads by default)")
    p.add_argument("--repo-id", default=os.environ.get("MATCHED_FINEWEB_REPO_ID", DEFAULT_REPO_ID),
                   help=f"Hugging Face dataset repo (default {DEFAULT_REPO_ID}, or $MATCHED_FINEWEB_REPO_ID)")
    p.add_argument("--remote-root", default=REMOTE_ROOT, help=f"folder of the export inside the repo (default {REMOTE_ROOT})")
    p.add_argument("--revision", default="main", help="git revision of the dataset repo (default main)")
    p.add_argument("--refresh-manifest", action="store_true", help="fetch manifest.json again even if data/ has one")
    p.add_argument("--retries", type=int, default=5, help="extra attempts per file after a dropped connection (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a connection counts as dropped")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.train_shards_pos is not None:
        if args.train_shards is not None and args.train_shards != args.train_shards_pos:
            print("error: give the number of train shards once", file=sys.stderr)
            return 2
        args.train_shards = args.train_shards_pos
    if args.train_shards is not None and args.train_shards < 0:
        print(f"error: --train-shards {args.train_shards} must be >= 0", file=sys.stderr)
        return 2
    endpoint = hub_endpoint()
    url_of = lambda rel: file_url(endpoint, args.repo_id, args.revision, f"{args.remote_root.strip('/')}/{rel}")  # noqa: E731
    progress = Progress(n_files=1)
    try:
        manifest, manifest_path = load_manifest(args.out, url_of("manifest.json"), args, progress)
        files = plan(manifest, manifest_path, args.variant, args.train_shards)
        progress = Progress(n_files=len(files))
        counts = {"skipped": 0, "downloaded": 0, "resumed": 0}
        for rel in files:
            dest = safe_local(args.out, rel)
            progress.begin(rel)
            counts[download(url_of(rel), dest, rel.endswith(".bin"), args.retries, args.timeout, progress)] += 1
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    name = f"fineweb10B_{args.variant}"
    tokenizers = [f for f in files if not f.endswith(".bin")]
    model = safe_local(args.out, next((f for f in tokenizers if f.endswith(".model")), tokenizers[0]))
    print(f"{len(files)} files ready in {args.out} ({counts['downloaded']} downloaded, {counts['resumed']} resumed from "
          f"an earlier run, {counts['skipped']} already complete)")
    print(f"DATA_PATH={args.out / 'datasets' / name} TOKENIZER_PATH={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

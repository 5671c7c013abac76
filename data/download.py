"""Download the official cached FineWeb export (tokenizer + challenge shards) from the Hugging Face Hub.

    python data/download.py --variant sp1024 --train-shards 80
    python data/download.py --variant sp8192 --train-shards 128
    python data/download.py --variant sp8192_caseops --train-shards 80

writes the layout train_gpt.py reads by default for VOCAB_SIZE=V (variant spV):

    data/tokenizers/fineweb_V_bpe.model (+ .vocab)
    data/datasets/fineweb10B_spV/fineweb_val_000000.bin ...     (validation: always all of it)
    data/datasets/fineweb10B_spV/fineweb_train_000000.bin ...   (the first --train-shards train shards)

and for sp8192_caseops (the CaseOps export of records #1729 onward; train_gpt.py's defaults with CASEOPS=1):

    data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
    data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_val_000000.bin, fineweb_train_*.bin
    data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/fineweb_val_bytes_000000.bin ...
        (the val byte sidecar: one uint16 per val token, its bytes of the original text; one per val shard, each
        checked to match its val shard token for token: as many entries, and 0 at every BOS)

Each variant has a default dataset repo (REPOS; --repo-id names another). The export lives under `datasets/` in the
repo and `datasets/manifest.json` describes it: `datasets[]` entries (name `fineweb10B_<variant>`, `tokenizer_name`,
`stats.files_train`, `stats.files_val`) and `tokenizers[]` entries (`name`, `model_path` / `vocab_path` / `path`,
relative to `datasets/`).

huggingface_hub does the transfer (hf_hub_download: retries, the Hub cache, HF_ENDPOINT, HF_TOKEN, HF_HOME,
HF_HUB_OFFLINE). The manifest is read from the cache of the chosen repo, which the library revalidates on every
run, so a manifest of another repo or an older commit is never used. What this script adds: every shard is checked
(header magic, version and token count against the file size) before it is placed, a file appears under its final
name only once complete and checked (a hard link to the cached file where the file system allows, else a copy), a
rerun checks finished files and skips them (only the manifest is asked for again; HF_HUB_OFFLINE=1 runs without
network), and every failure is one line naming the file or value, exit code 1. --train-shards N fetches a prefix.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

# Where each variant's export lives: sp1024 is the official one; sp4096 and sp8192 are the export that the SP4096 and
# SP8192 records of openai/parameter-golf download (records/track_10min_16mb/2026-04-05_SP8192_*/README.md);
# sp8192_caseops the CaseOps export of #1729 (records/track_10min_16mb/2026-04-18_PR1626_CaseOps_Taper/README.md).
REPOS = {"sp1024": "willdepueoai/parameter-golf",
         "sp4096": "kevclark/parameter-golf",
         "sp8192": "kevclark/parameter-golf",
         "sp8192_caseops": "romeerp/parameter-golf-caseops-v1"}
DATASET_NAMES = {"sp8192_caseops": "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"}   # else fineweb10B_<variant>
REMOTE_ROOT = "datasets"              # the export lives under this folder of the dataset repo
DEFAULT_TRAIN_SHARDS = 80             # 8B tokens: more than one 600 s run on 8 x H100 can read
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
BOS_ID = 1                            # every document of a shard starts with it


class DownloadError(Exception):
    """A problem the user must see: one line, exit code 1."""


# ==================================================================================================
# Verification
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


def check_sidecar(val: Path, sidecar: Path) -> str | None:
    """Why `sidecar` is not the byte sidecar of the val shard `val` (both whole shards), or None: one entry per val
    token, and 0 at every BOS (a document boundary has no bytes of text)."""
    tokens = np.fromfile(val, dtype="<u2", offset=HEADER_BYTES)
    counts = np.fromfile(sidecar, dtype="<u2", offset=HEADER_BYTES)
    if len(counts) != len(tokens):
        return f"{len(counts)} entries, but its val shard {val.name} has {len(tokens)} tokens"
    bos = np.flatnonzero((tokens == BOS_ID) & (counts != 0))
    if len(bos):
        return f"{int(counts[bos[0]])} bytes at token {int(bos[0])}, a BOS of {val.name} (it must count 0)"
    return None


# ==================================================================================================
# The Hub (huggingface_hub), with its exceptions turned into one line each
# ==================================================================================================

def first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def explain(e: Exception, repo_id: str, path: str, revision: str) -> str:
    """One line for what hf_hub_download raised, naming the file and the value to check."""
    from huggingface_hub import constants
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)
    what = f"{repo_id}:{path}"
    status = lambda err: getattr(getattr(err, "response", None), "status_code", "?")   # noqa: E731
    if isinstance(e, GatedRepoError):
        return f"{what}: the dataset repo is gated (HTTP {status(e)}); accept its terms on the Hub and set HF_TOKEN"
    if isinstance(e, RepositoryNotFoundError):
        return (f"{what}: dataset repo {repo_id} not found or private (HTTP {status(e)}); check --repo-id, "
                f"or set HF_TOKEN for a private repo")
    if isinstance(e, RevisionNotFoundError):
        return f"{what}: revision {revision!r} not found in {repo_id} (HTTP {status(e)}); check --revision"
    if isinstance(e, LocalEntryNotFoundError):   # the library's "no answer from the Hub, and not in the cache"
        cause = e.__cause__ or e.__context__
        if isinstance(cause, HfHubHTTPError):
            return f"{what}: HTTP {status(cause)} from {constants.ENDPOINT} ({first_line(cause)})"
        if constants.HF_HUB_OFFLINE:
            return f"{what}: not in the Hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set"
        reason = f"{type(cause).__name__}: {first_line(cause)}" if cause else first_line(e)
        return f"{what}: cannot reach {constants.ENDPOINT} ({reason}); no network? (HF_ENDPOINT names a mirror)"
    if isinstance(e, EntryNotFoundError):
        return f"{what}: not found (HTTP 404); check --repo-id, --variant and the repo's manifest"
    if isinstance(e, HfHubHTTPError):
        return f"{what}: HTTP {status(e)} ({first_line(e)})"
    return f"{what}: {first_line(e)}"


def hub_file(repo_id: str, path: str, revision: str, force: bool = False) -> Path:
    """The cached copy of one file of the dataset repo (downloaded now unless the cache has it at this commit)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DownloadError("huggingface_hub is not installed: pip install -r requirements.txt") from None
    try:
        return Path(hf_hub_download(repo_id, path, repo_type="dataset", revision=revision, force_download=force))
    except Exception as e:   # HTTP, transport, cache and argument errors alike: one line each
        raise DownloadError(explain(e, repo_id, path, revision)) from None


def place(src: Path, dest: Path) -> bool:
    """Make dest a hard link to (or a copy of) src; it appears under its name only when complete. True: linked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")   # hidden: train_gpt.py's fineweb_*.bin globs never see it
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
            linked = True
        except OSError:   # another file system (HF_HOME elsewhere) or no hard links: copy
            shutil.copyfile(src, tmp)
            linked = False
        os.replace(tmp, dest)
        return linked
    except OSError as e:
        raise DownloadError(f"{dest}: cannot write it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch(repo_id: str, path: str, revision: str, dest: Path, is_shard: bool) -> str:
    """Make dest a complete, checked copy of one repo file: 'already complete', 'downloaded' (a hard link to the
    Hub cache) or 'copied' (downloaded, then copied out of a cache on another file system)."""
    if dest.exists():
        problem = check_shard(dest) if is_shard else None
        if problem is None:
            return "already complete"
        print(f"{dest}: {problem}; downloading it again", file=sys.stderr)
        dest.unlink()
    # A bad cached copy (a damaged hard link shares its bytes) is replaced by a forced download, once.
    for force in (False, True):
        cached = hub_file(repo_id, path, revision, force)
        blob = cached.resolve()
        problem = check_shard(blob) if is_shard else None
        if problem is None:
            return "downloaded" if place(blob, dest) else "copied"
    for p in (cached, blob):   # nothing the library would reuse as finished either
        p.unlink(missing_ok=True)
    raise DownloadError(f"{repo_id}:{path}: the downloaded shard is corrupt: {problem}; deleted it "
                        f"(downloaded twice, so the file in the repo is bad)")


# ==================================================================================================
# Manifest and plan
# ==================================================================================================

def safe_local(out: Path, rel: str) -> Path:
    """out/rel, refusing manifest paths that would escape the output folder."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise DownloadError(f"manifest path {rel!r} is not a relative path inside the export")
    return out / p


def load_manifest(repo_id: str, remote_root: str, revision: str) -> tuple[dict, str]:
    where = "/".join(p for p in (remote_root, "manifest.json") if p)
    path = hub_file(repo_id, where, revision)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DownloadError(f"{repo_id}:{where} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DownloadError(f"{repo_id}:{where}: expected a JSON object")
    return manifest, f"{repo_id}:{where}"


def dataset_name(variant: str) -> str:
    return DATASET_NAMES.get(variant, f"fineweb10B_{variant}")


def has_sidecar(variant: str) -> bool:
    """CaseOps data is scored by its val byte sidecar (its pieces hold operators and lowercased capitals)."""
    return "caseops" in dataset_name(variant)


def sidecar_path(val_path: str) -> str:
    return val_path.replace("/fineweb_val_", "/fineweb_val_bytes_")


def plan(manifest: dict, where: str, variant: str, train_shards: int | None) -> list[str]:
    """Paths (relative to the export root) to fetch: tokenizer files, every val shard (and for CaseOps its byte
    sidecar), the first N train shards."""
    datasets = {d.get("name"): d for d in manifest.get("datasets", []) if isinstance(d, dict)}
    name = dataset_name(variant)
    if name not in datasets:
        variants = {n: v for v, n in DATASET_NAMES.items()}
        known = sorted(variants.get(n, n.removeprefix("fineweb10B_")) for n in datasets if str(n).startswith("fineweb10B_"))
        raise DownloadError(f"--variant {variant}: {where} lists no dataset {name}; available: {', '.join(known) or 'none'}")
    entry = datasets[name]
    stats = entry.get("stats") or {}
    try:
        n_train, n_val = int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DownloadError(f"{where}: dataset {name} has no stats.files_train / stats.files_val") from None
    if train_shards is None:
        train_shards = min(DEFAULT_TRAIN_SHARDS, n_train)
    if train_shards > n_train:
        raise DownloadError(f"--train-shards {train_shards}: {name} has only {n_train} train shards")
    tok_name = entry.get("tokenizer_name")
    tok = next((t for t in manifest.get("tokenizers", []) if isinstance(t, dict) and t.get("name") == tok_name), None)
    if tok is None:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} of dataset {name} is not in its tokenizers list")
    tok_files = [str(tok[k]) for k in ("model_path", "vocab_path", "path") if tok.get(k)]
    if not tok_files:
        raise DownloadError(f"{where}: tokenizer {tok_name!r} names no file (model_path / vocab_path / path)")
    shards = [f"datasets/{name}/fineweb_val_{i:06d}.bin" for i in range(n_val)]
    if has_sidecar(variant):
        shards += [sidecar_path(f) for f in shards]
    shards += [f"datasets/{name}/fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    return tok_files + shards


# ==================================================================================================
# main
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: python data/download.py --variant sp8192 --train-shards 128")
    p.add_argument("train_shards_pos", nargs="?", type=int, default=None, metavar="TRAIN_SHARDS",
                   help="same as --train-shards (the official script's positional form)")
    p.add_argument("--variant", default="sp1024",
                   help=f"tokenizer family: {', '.join(REPOS)} (default sp1024); with --repo-id, any the manifest lists")
    p.add_argument("--train-shards", type=int, default=None,
                   help=f"number of train shards of 100M tokens to fetch, a prefix of the frozen shuffled export "
                        f"(default: {DEFAULT_TRAIN_SHARDS}, or all if fewer); validation is always fetched in full")
    p.add_argument("--out", type=Path, default=Path("data"),
                   help="output folder (default ./data: the layout train_gpt.py reads by default)")
    p.add_argument("--repo-id", default=None,
                   help="Hugging Face dataset repo (default: the variant's, " +
                        ", ".join(f"{v} {r}" for v, r in REPOS.items()) + ")")
    p.add_argument("--remote-root", default=REMOTE_ROOT, help=f"folder of the export inside the repo (default {REMOTE_ROOT})")
    p.add_argument("--revision", default="main", help="branch, tag or commit of the dataset repo (default main)")
    return p


def check_args(args) -> str:
    """The repo to read, after the checks argparse cannot make (one-line errors, exit code 1)."""
    if args.train_shards_pos is not None:
        if args.train_shards is not None and args.train_shards != args.train_shards_pos:
            raise DownloadError("give the number of train shards once")
        args.train_shards = args.train_shards_pos
    if args.train_shards is not None and args.train_shards < 0:
        raise DownloadError(f"--train-shards {args.train_shards} must be >= 0")
    if not re.fullmatch(r"[A-Za-z0-9_]+", args.variant):
        raise DownloadError(f"--variant {args.variant!r}: expected a name such as sp8192")
    if args.repo_id is None and args.variant not in REPOS:
        raise DownloadError(f"--variant {args.variant}: unknown; known: {', '.join(REPOS)} (another needs --repo-id)")
    return args.repo_id or REPOS[args.variant]


def check_sidecars(files: list[str], dests: list[Path], repo_id: str, root: str) -> None:
    """Each downloaded val byte sidecar against its val shard; a wrong one is deleted, so no run can read it."""
    where = dict(zip(files, dests))
    for rel in files:
        if (side := sidecar_path(rel)) != rel and side in where:
            problem = check_sidecar(where[rel], where[side])
            if problem is not None:
                where[side].unlink()
                path = "/".join(p for p in (root, side) if p)
                raise DownloadError(f"{repo_id}:{path}: not the byte sidecar of its val shard: {problem}; deleted it")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        repo_id = check_args(args)
        root = args.remote_root.strip("/")
        manifest, where = load_manifest(repo_id, root, args.revision)
        files = plan(manifest, where, args.variant, args.train_shards)
        dests = [safe_local(args.out, rel) for rel in files]   # every manifest path checked before any download
        counts = {"downloaded": 0, "copied": 0, "already complete": 0}
        for i, (rel, dest) in enumerate(zip(files, dests), 1):
            how = fetch(repo_id, "/".join(p for p in (root, rel) if p), args.revision, dest, rel.endswith(".bin"))
            counts[how] += 1
            print(f"[{i}/{len(files)}] {rel} {how.replace('copied', 'downloaded')}", file=sys.stderr, flush=True)
        check_sidecars(files, dests, repo_id, root)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command; finished files are kept", file=sys.stderr)
        return 130
    name = dataset_name(args.variant)
    tokenizers = [f for f in files if not f.endswith(".bin")]
    model = safe_local(args.out, next((f for f in tokenizers if f.endswith(".model")), tokenizers[0]))
    vocab = f"VOCAB_SIZE={m.group(1)} " if (m := re.fullmatch(r"sp(\d+)(_caseops)?", args.variant)) else ""
    print(f"{len(files)} files ready in {args.out} from {repo_id} ({counts['downloaded'] + counts['copied']} "
          f"downloaded, {counts['already complete']} already complete)")
    if counts["copied"]:
        print(f"note: the Hub cache is on another file system than {args.out}, so {counts['copied']} files were "
              f"copied and take twice the space; HF_HUB_CACHE={args.out / '.hub-cache'} keeps one copy",
              file=sys.stderr)
    print(f"{vocab}DATA_PATH={args.out / 'datasets' / name} TOKENIZER_PATH={model}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

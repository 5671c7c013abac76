"""Turn your own text into challenge-format shards, so the whole pipeline runs on your data.

    python data/build_shards.py --tokenizer data/tokenizers/fineweb_1024_bpe.model \\
        --out data/datasets/mytext_sp1024 --val-docs 1000 corpus.jsonl more_text/

Inputs are files or folders (every file under a folder, in name order):
  *.jsonl / *.jsonl.gz   one JSON object per line; the document is its "text" field (--text-field)
  anything else          plain UTF-8 text (.gz is read compressed); --plain-docs says how it splits into documents

Output, as the official export: every document is BOS (id 1) followed by its SentencePiece ids; documents are
concatenated and cut into shards of --shard-tokens uint16 tokens (a document may continue in the next shard),
each shard a 256 x int32 little-endian header (magic 20240520, version 1, token count) then the tokens.
The first --val-docs documents (or --val-fraction of them) form the validation split, the rest the train split,
as the official validation split is the first 50,000 documents: shuffle your input first if it is ordered.
Files: <out>/fineweb_val_000000.bin ..., <out>/fineweb_train_000000.bin ..., and <out>/build_info.json.
The folder is built beside <out> and renamed into place when complete. Needs numpy and sentencepiece.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

BOS_ID = 1                        # train_gpt.py and the official shards: every document starts with id 1
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DEFAULT_SHARD_TOKENS = 100_000_000
ENCODE_BATCH = 1024               # documents per SentencePiece call


class BuildError(Exception):
    """Bad input: one line naming the file or value, exit code 1."""


# ==================================================================================================
# Reading documents
# ==================================================================================================

def input_files(inputs: list[Path]) -> list[Path]:
    files = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(s.startswith(".") for s in f.relative_to(p).parts))
            if not found:
                raise BuildError(f"{p}: folder has no files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise BuildError(f"{p}: no such file or folder")
    return files


def open_text(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    return opener(path, "rt", encoding="utf-8", newline="")


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def read_documents(files: list[Path], text_field: str, plain_docs: str):
    """Yield every document's text in input order; blank documents are dropped (a lone BOS teaches nothing)."""
    for path in files:
        try:
            with open_text(path) as f:
                if is_jsonl(path):
                    yield from _jsonl_docs(path, f, text_field)
                else:
                    yield from _plain_docs(f, plain_docs)
        except UnicodeDecodeError as e:
            raise BuildError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except (OSError, EOFError) as e:
            raise BuildError(f"{path}: cannot read: {e}") from None


def _jsonl_docs(path: Path, f, text_field: str):
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BuildError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise BuildError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
        if obj[text_field].strip():
            yield obj[text_field]


def _plain_docs(f, plain_docs: str):
    if plain_docs == "file":
        text = f.read()
        if text.strip():
            yield text
        return
    if plain_docs == "line":
        for line in f:
            if line.strip():
                yield line.rstrip("\r\n")
        return
    para: list[str] = []        # "paragraph": blocks separated by blank lines
    for line in f:
        if line.strip():
            para.append(line.rstrip("\r\n"))
        elif para:
            yield "\n".join(para)
            para = []
    if para:
        yield "\n".join(para)


# ==================================================================================================
# Writing shards
# ==================================================================================================

def write_shard(path: Path, tokens: np.ndarray) -> None:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2", copy=False).tobytes())


class ShardWriter:
    """Concatenates documents of one split and cuts the stream into shards of exactly shard_tokens (the last shorter)."""

    def __init__(self, out: Path, split: str, shard_tokens: int) -> None:
        self.out, self.split, self.shard_tokens = out, split, shard_tokens
        self.buf: np.ndarray | None = None     # allocated on first use: one split is open at a time
        self.fill = self.shards = self.tokens = self.docs = 0

    def add(self, doc: np.ndarray) -> None:
        if self.buf is None:
            self.buf = np.empty(self.shard_tokens, dtype=np.uint16)
        self.docs += 1
        self.tokens += len(doc)
        while len(doc):
            k = min(len(doc), self.shard_tokens - self.fill)
            self.buf[self.fill:self.fill + k] = doc[:k]
            self.fill += k
            doc = doc[k:]
            if self.fill == self.shard_tokens:
                self.flush()

    def flush(self) -> None:
        if self.fill:
            write_shard(self.out / f"fineweb_{self.split}_{self.shards:06d}.bin", self.buf[:self.fill])
            self.shards += 1
            self.fill = 0

    def close(self) -> dict:
        self.flush()
        self.buf = None
        return {"docs": self.docs, "tokens": self.tokens, "shards": self.shards}


def load_tokenizer(path: Path):
    import sentencepiece as spm
    if not path.is_file():
        raise BuildError(f"--tokenizer {path}: file not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise BuildError(f"--tokenizer {path}: not a SentencePiece model ({e})") from None
    if sp.bos_id() != BOS_ID:
        raise BuildError(f"--tokenizer {path}: its BOS id is {sp.bos_id()}, but the shard format and train_gpt.py "
                         f"need BOS id {BOS_ID} (train the model with bos_id=1)")
    if sp.vocab_size() > 65536:
        raise BuildError(f"--tokenizer {path}: {sp.vocab_size()} pieces do not fit uint16 tokens")
    return sp


def encode_batches(sp, docs, batch: int = ENCODE_BATCH):
    """Yield each document as [BOS] + its ids (uint16), encoding `batch` documents per SentencePiece call."""
    pending: list[str] = []
    for text in docs:
        pending.append(text)
        if len(pending) == batch:
            yield from _encode(sp, pending)
            pending = []
    if pending:
        yield from _encode(sp, pending)


def _encode(sp, texts: list[str]):
    for ids in sp.encode(texts):
        doc = np.empty(len(ids) + 1, dtype=np.uint16)
        doc[0] = BOS_ID
        doc[1:] = ids
        yield doc


def build(files: list[Path], sp, out_tmp: Path, n_val: int, shard_tokens: int, text_field: str, plain_docs: str) -> dict:
    """Write both splits into out_tmp; return the counts. The first n_val documents are validation."""
    val, train = ShardWriter(out_tmp, "val", shard_tokens), ShardWriter(out_tmp, "train", shard_tokens)
    for i, doc in enumerate(encode_batches(sp, read_documents(files, text_field, plain_docs))):
        if i < n_val:
            val.add(doc)
            continue
        if i == n_val:
            val.close()   # free the validation buffer before the train one is allocated
        train.add(doc)
    return {"val": val.close(), "train": train.close()}


def count_documents(files: list[Path], text_field: str, plain_docs: str) -> int:
    return sum(1 for _ in read_documents(files, text_field, plain_docs))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with --force the old folder goes only after the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


# ==================================================================================================
# main
# ==================================================================================================

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="jsonl / text files or folders of them")
    p.add_argument("--tokenizer", type=Path, required=True, help="SentencePiece .model (BOS id must be 1)")
    p.add_argument("--out", type=Path, required=True, help="output folder for the shards (created; see --force)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-docs", type=int, help="the first N documents form the validation split")
    split.add_argument("--val-fraction", type=float, default=0.01,
                       help="the first fraction of the documents forms the validation split (default 0.01, at least 1)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as the official export)")
    p.add_argument("--text-field", default="text", help="the JSON field holding a document's text (default text)")
    p.add_argument("--plain-docs", choices=("paragraph", "line", "file"), default="paragraph",
                   help="documents of a plain text file: paragraphs separated by blank lines (default), lines, or the whole file")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists (the whole folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.shard_tokens <= 0:
            raise BuildError(f"--shard-tokens {args.shard_tokens} must be > 0")
        if args.val_docs is None and not 0 < args.val_fraction < 1:
            raise BuildError(f"--val-fraction {args.val_fraction} must be between 0 and 1")
        if args.out.exists() and not args.force:
            raise BuildError(f"--out {args.out} already exists; pass --force to replace it")
        sp = load_tokenizer(args.tokenizer)
        files = input_files(args.inputs)
        if args.val_docs is not None:
            n_val = args.val_docs
        else:   # a counting pass: reading text is cheap next to tokenizing it
            n_val = max(1, round(args.val_fraction * count_documents(files, args.text_field, args.plain_docs)))
        if n_val < 1:
            raise BuildError(f"--val-docs {n_val} must be >= 1")
        tmp.mkdir(parents=True)
        stats = build(files, sp, tmp, n_val, args.shard_tokens, args.text_field, args.plain_docs)
        total = stats["val"]["docs"] + stats["train"]["docs"]
        if stats["train"]["docs"] == 0:
            raise BuildError(f"the input has {total} non-empty documents: the {n_val} validation documents leave none "
                             f"for training (lower --val-docs / --val-fraction, or split plain text with --plain-docs)")
        info = {"tokenizer": str(args.tokenizer), "tokenizer_sha256": sha256(args.tokenizer),
                "vocab_size": sp.vocab_size(), "bos_id": BOS_ID, "shard_tokens": args.shard_tokens,
                "inputs": [str(f) for f in files], **stats}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        place(tmp, args.out, args.force)
    except BuildError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split in ("val", "train"):
        s = stats[split]
        print(f"{split}: {s['docs']} documents, {s['tokens']} tokens, {s['shards']} shards")
    print(f"DATA_PATH={args.out} TOKENIZER_PATH={args.tokenizer} VOCAB_SIZE={sp.vocab_size()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

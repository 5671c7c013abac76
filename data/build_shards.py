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
as the official validation split is the first 50,000 documents: shuffle your input first if it is ordered. Documents
are counted from 0 in input order, blank ones skipped. When the first input has the official export's manifest beside
it (docs_selected.jsonl -> docs_selected.source_manifest.json, "docs_val": 50000), that is the split: the default,
and any other --val-docs / --val-fraction is refused (a smaller one puts validation documents into training:
openai/parameter-golf issue #2127). A train document with the same tokens as a validation document is refused too
(the build stops, nothing is written).
Files: <out>/fineweb_val_000000.bin ..., <out>/fineweb_train_000000.bin ..., and <out>/build_info.json.
The folder is built beside <out> and renamed into place when complete. Needs numpy and sentencepiece.

--caseops (with the CaseOps tokenizer, fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model) writes the CaseOps
data of records #1729 onward: every document is first put in the form the tokenizer keeps (its NFKC and whitespace
normalization), then rewritten by data/caseops.py, then tokenized; the val split also gets its byte sidecar
<out>/fineweb_val_bytes_000000.bin ... (one uint16 per val token: its bytes of the document's UTF-8 text), each val
document checked to give its text back and to count exactly its bytes. The split must be given (--val-docs,
--val-fraction or the manifest above): no 1% default.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import caseops  # noqa: E402   data/caseops.py, beside this script

BOS_ID = 1                        # train_gpt.py and the official shards: every document starts with id 1
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_VAL_FRACTION = 0.01
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


def batches(items, size: int):
    pending: list = []
    for item in items:
        pending.append(item)
        if len(pending) == size:
            yield pending
            pending = []
    if pending:
        yield pending


def with_bos(ids) -> np.ndarray:
    doc = np.empty(len(ids) + 1, dtype=np.uint16)
    doc[0] = BOS_ID
    doc[1:] = ids
    return doc


def check_caseops_tokenizer(sp, path: Path, use_caseops: bool) -> None:
    """--caseops needs a tokenizer with the four operators, and a tokenizer with them needs --caseops (its val
    bytes can only come from the sidecar, which only --caseops writes)."""
    has_operators = all(sp.piece_to_id(op) != sp.unk_id() for op in caseops.OPERATORS)
    if use_caseops and not has_operators:
        raise BuildError(f"--tokenizer {path}: --caseops needs a CaseOps tokenizer (pieces U+E001..U+E004), e.g. "
                         f"fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    if has_operators and not use_caseops:
        raise BuildError(f"--tokenizer {path} is a CaseOps tokenizer (pieces U+E001..U+E004): pass --caseops")


def encode_batches(sp, docs, use_caseops: bool = False, batch: int = ENCODE_BATCH):
    """Yield (text, [BOS] + its ids as uint16) per document, `batch` documents per SentencePiece call. With CaseOps
    the text is the one the tokens stand for: the document as the tokenizer keeps it, before the transform."""
    for texts in batches(docs, batch):
        if use_caseops:
            texts = [caseops.canonical_text(sp, t) for t in texts]
        for text, ids in zip(texts, sp.encode([caseops.encode(t) for t in texts] if use_caseops else texts)):
            yield text, with_bos(ids)


def build(files: list[Path], sp, out_tmp: Path, n_val: int, shard_tokens: int, text_field: str, plain_docs: str,
          use_caseops: bool = False) -> dict:
    """Write both splits (and with CaseOps the val byte sidecar) into out_tmp; return the counts. The first n_val
    documents are validation; a train document with the tokens of a validation one is a BuildError."""
    val, train = ShardWriter(out_tmp, "val", shard_tokens), ShardWriter(out_tmp, "train", shard_tokens)
    sidecar = ShardWriter(out_tmp, "val_bytes", shard_tokens) if use_caseops else None   # cut where val is cut
    table = caseops.PieceBytes(sp) if use_caseops else None
    val_docs: dict[bytes, int] = {}   # digest of each val document's tokens -> its index
    val_bytes = 0
    for i, (text, doc) in enumerate(encode_batches(sp, read_documents(files, text_field, plain_docs), use_caseops)):
        digest = hashlib.blake2b(doc.tobytes(), digest_size=16).digest()
        if i < n_val:
            val_docs.setdefault(digest, i)
            val.add(doc)
            if sidecar is not None:
                counts = caseops.token_bytes(table, doc[1:].tolist(), text, f"document {i} (validation)")
                sidecar.add(np.concatenate(([0], counts)).astype(np.uint16))     # BOS: 0 bytes
                val_bytes += int(counts.sum())
            continue
        if i == n_val:    # free the validation buffers before the train one is allocated
            val.close()
            if sidecar is not None:
                sidecar.close()
        if digest in val_docs:
            raise BuildError(f"document {i} (train) has the same tokens as validation document {val_docs[digest]}: "
                             f"a document may be in one split only (remove the duplicate from the input)")
        train.add(doc)
    stats = {"val": val.close(), "train": train.close()}
    if sidecar is not None:
        stats["val_bytes"] = {**sidecar.close(), "bytes": val_bytes}
    return stats


def count_documents(files: list[Path], text_field: str, plain_docs: str) -> int:
    return sum(1 for _ in read_documents(files, text_field, plain_docs))


def declared_val_docs(first: Path) -> tuple[Path, int] | None:
    """(manifest, its "docs_val") when the first input is an official docs export with its source manifest beside it."""
    manifest = first.with_name(first.name.removesuffix(".gz").removesuffix(".jsonl") + ".source_manifest.json")
    if not is_jsonl(first) or not manifest.is_file():
        return None
    try:
        declared = json.loads(manifest.read_text(encoding="utf-8")).get("docs_val")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise BuildError(f"{manifest}: cannot read its docs_val ({e})") from None
    return (manifest, declared) if isinstance(declared, int) else None


def validation_docs(args, files: list[Path]) -> int:
    """How many leading documents form the validation split: --val-docs, --val-fraction, the docs export's manifest,
    else 1% (never with --caseops); any number but the manifest's is refused."""
    declared = declared_val_docs(files[0])
    if args.val_docs is not None:
        n_val = args.val_docs
    elif args.val_fraction is not None or (declared is None and not args.caseops):
        fraction = DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction
        n_val = max(1, round(fraction * count_documents(files, args.text_field, args.plain_docs)))   # a counting pass
    elif declared is not None:
        n_val = declared[1]
    else:
        raise BuildError("--caseops needs the validation split given: --val-docs N (FineWeb's docs_selected.jsonl: "
                         "--val-docs 50000, the official split) or --val-fraction F")
    if n_val < 1:
        raise BuildError(f"--val-docs {n_val} must be >= 1")
    if declared is not None and n_val != declared[1]:
        manifest, official = declared
        harm = (f"would put {official - n_val} of them into training (openai/parameter-golf issue #2127)" if n_val < official
                else f"would score {n_val - official} training documents as validation")
        raise BuildError(f"{manifest} says the first {official} documents of {files[0].name} are the validation split: "
                         f"{n_val} {harm}; leave the split out to use it")
    return n_val


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
    split.add_argument("--val-fraction", type=float, default=None,
                       help=f"the first fraction of the documents forms the validation split (at least 1 document; "
                            f"default {DEFAULT_VAL_FRACTION}, except with --caseops, which needs the split given)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, as the official export)")
    p.add_argument("--text-field", default="text", help="the JSON field holding a document's text (default text)")
    p.add_argument("--plain-docs", choices=("paragraph", "line", "file"), default="paragraph",
                   help="documents of a plain text file: paragraphs separated by blank lines (default), lines, or the whole file")
    p.add_argument("--force", action="store_true", help="replace --out if it already exists (the whole folder)")
    p.add_argument("--caseops", action="store_true",
                   help="CaseOps data: transform each document (data/caseops.py) and write the val byte sidecar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    try:
        if args.shard_tokens <= 0:
            raise BuildError(f"--shard-tokens {args.shard_tokens} must be > 0")
        if args.val_fraction is not None and not 0 < args.val_fraction < 1:
            raise BuildError(f"--val-fraction {args.val_fraction} must be between 0 and 1")
        if args.out.exists() and not args.force:
            raise BuildError(f"--out {args.out} already exists; pass --force to replace it")
        sp = load_tokenizer(args.tokenizer)
        check_caseops_tokenizer(sp, args.tokenizer, args.caseops)
        files = input_files(args.inputs)
        n_val = validation_docs(args, files)
        tmp.mkdir(parents=True)
        stats = build(files, sp, tmp, n_val, args.shard_tokens, args.text_field, args.plain_docs, args.caseops)
        total = stats["val"]["docs"] + stats["train"]["docs"]
        if stats["train"]["docs"] == 0:
            raise BuildError(f"the input has {total} non-empty documents: the {n_val} validation documents leave none "
                             f"for training (lower --val-docs / --val-fraction, or split plain text with --plain-docs)")
        info = {"tokenizer": str(args.tokenizer), "tokenizer_sha256": sha256(args.tokenizer),
                "vocab_size": sp.vocab_size(), "bos_id": BOS_ID, "shard_tokens": args.shard_tokens,
                "text_transform": "lossless_caps_caseops_v1" if args.caseops else "identity",
                "inputs": [str(f) for f in files], **stats}
        (tmp / "build_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        place(tmp, args.out, args.force)
    except (BuildError, caseops.CaseOpsError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split in ("val", "train"):
        s = stats[split]
        print(f"{split}: {s['docs']} documents, {s['tokens']} tokens, {s['shards']} shards")
    if args.caseops:
        print(f"val byte sidecar: {stats['val_bytes']['bytes']} bytes of text over {stats['val_bytes']['tokens']} "
              f"tokens, {stats['val_bytes']['shards']} shards")
    print(f"DATA_PATH={args.out} TOKENIZER_PATH={args.tokenizer} VOCAB_SIZE={sp.vocab_size()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

r"""Check, on real data, that train_gpt.py's byte count (ByteTables) equals the UTF-8 length of the text the tokens
stand for: each document (it starts at a BOS, id 1) decoded by its own tokenizer.

    python tools/check_bytes.py --tokenizer data/tokenizers/fineweb_8192_bpe.model \
        --shard data/datasets/fineweb10B_sp8192/fineweb_val_000000.bin [--docs 1000]

The stream is counted the way the evaluation counts it: every target after the shard's first token, with the token
before it in the stream as its predecessor (a document's first token follows its BOS; a BOS target counts 0 bytes).
Each document's count must equal len(decoded.encode("utf-8")).

One wrinkle of SentencePiece's decoder (openai/parameter-golf issue #897): a "▁" that the tokenizer could not encode
as a piece falls back to the three byte pieces <0xE2><0x96><0x81>, and decode() gives them back as a literal "▁"
instead of the space it escapes. The reference here reads every such "▁" as that one space byte (and a leading one
as the dummy prefix, which is no text), so a tokenizer without a standalone "▁" piece shows up as mismatches instead
of agreeing with itself. `fallback_spaces` counts them; it is 0 for tokenizers that have the piece.

A CaseOps tokenizer (its pieces hold the case operators U+E001..U+E004) is scored from the val byte sidecar, not
from its pieces, so for it the sidecar is what is checked: per document, the sidecar's sum must equal the UTF-8
length of the original text, the inverse transform (data/caseops.py) of the decoded tokens. --sidecar names it
(default: fineweb_val_bytes_<N>.bin beside fineweb_val_<N>.bin); the first mismatching document is printed.

Prints the mismatching documents (at most --show), then one summary line. Exit code: 0 exact, 1 mismatches, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train_gpt as T  # noqa: E402

SPACE = "\u2581"   # SentencePiece's escaped whitespace


@dataclass
class Report:
    documents: int = 0
    tokens: int = 0             # ids in the checked documents, their BOS included
    bytes: int = 0              # train_gpt's count over every target of the stream
    decoded_bytes: int = 0      # sum over documents of the decoded UTF-8 length
    fallback_spaces: int = 0    # "▁" left in the decoded text by byte fallback (see the module doc)
    mismatches: list = field(default_factory=list)   # (document index, counted, decoded, decoded text)

    def summary(self) -> str:
        return (f"check_bytes: documents={self.documents} tokens={self.tokens} bytes={self.bytes} "
                f"decoded_bytes={self.decoded_bytes} mismatches={len(self.mismatches)} "
                f"fallback_spaces={self.fallback_spaces}")


def decoded_text(sp, ids: list[int], dummy_prefix: bool) -> str:
    """The text a document's ids stand for: decode(), with the "▁" that byte fallback leaves read as a space."""
    text = sp.decode(ids)
    if dummy_prefix and text.startswith(SPACE):
        text = text[1:]          # the dummy prefix, fallen back to bytes: the decoder strips it only as a piece
    return text.replace(SPACE, " ")


def adds_dummy_prefix(sp) -> bool:
    return sp.normalize("a").startswith(SPACE)


def document_starts(stream: np.ndarray, docs: int | None) -> tuple[np.ndarray, int]:
    """(positions of the checked documents' BOS, end of the checked stream)."""
    if len(stream) == 0 or stream[0] != T.BOS_ID:
        raise T.RunError(f"the shard must start with BOS (id {T.BOS_ID}): every document starts with one")
    starts = np.flatnonzero(stream == T.BOS_ID)
    if docs is not None and docs < len(starts):
        return starts[:docs], int(starts[docs])
    return starts, len(stream)


def check(tokenizer: str, shard: str, docs: int | None = None) -> Report:
    import sentencepiece as spm
    if not Path(tokenizer).is_file():
        raise T.RunError(f"--tokenizer {tokenizer!r}: file not found")
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    tables = T.load_byte_tables(tokenizer, sp.vocab_size())
    stream = T.read_shard(shard, sp.vocab_size()).astype(np.int64)
    starts, end = document_starts(stream, docs)
    stream = stream[:end]
    t = torch.from_numpy(stream)
    per_target = tables.count(t[:-1], t[1:]).numpy()          # per_target[j]: target stream[j + 1]
    csum = np.concatenate(([0], np.cumsum(per_target)))
    dummy = adds_dummy_prefix(sp)
    ends = np.append(starts[1:], end)
    rep = Report(documents=len(starts), tokens=len(stream), bytes=int(per_target.sum()))
    for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        ids = stream[a + 1:b].tolist()
        raw = sp.decode(ids)
        text = decoded_text(sp, ids, dummy)
        rep.fallback_spaces += raw.count(SPACE)
        counted, decoded = int(csum[b - 1] - csum[a]), len(text.encode("utf-8"))   # targets a+1 .. b-1
        rep.decoded_bytes += decoded
        if counted != decoded:
            rep.mismatches.append((k, counted, decoded, text))
    if not rep.mismatches and rep.bytes != rep.decoded_bytes:   # only the BOS targets are left: they must count 0
        rep.mismatches.append((-1, rep.bytes, rep.decoded_bytes, "(the BOS targets)"))
    return rep


def is_caseops(sp) -> bool:
    return any(sp.piece_to_id(op) != sp.unk_id() for op in T.CASEOPS_OPERATORS)


def check_caseops(sp, shard: str, sidecar: str | None, docs: int | None) -> tuple[Report, object]:
    """(the report, the first mismatch or None) of a CaseOps val shard against its byte sidecar."""
    sys.path.insert(0, str(ROOT / "data"))
    import caseops
    path = Path(sidecar) if sidecar else Path(shard).with_name(Path(shard).name.replace("fineweb_val_", "fineweb_val_bytes_"))
    if not path.is_file():
        raise T.RunError(f"--sidecar {str(path)!r}: file not found (a CaseOps shard is checked against its sidecar)")
    stream = T.read_shard(shard, sp.vocab_size()).astype(np.int64)
    side = caseops.read_sidecar(path).astype(np.int64)
    if len(side) != len(stream):
        raise T.RunError(f"{path}: {len(side)} entries but {shard} has {len(stream)} tokens")
    starts, end = document_starts(stream, docs)
    try:
        first = caseops.check_sidecar(stream[:end], side[:end], sp)
    except caseops.CaseOpsError as e:
        raise T.RunError(f"{shard}: {e}") from None
    rep = Report(documents=len(starts), tokens=end, bytes=int(side[:end].sum()))
    if first is None:
        rep.decoded_bytes = rep.bytes
    else:
        rep.mismatches.append((first.document, first.found, first.expected, f"first differing token at stream index "
                                                                           f"{first.position}"))
    return rep, first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="the SentencePiece .model the shard was encoded with")
    ap.add_argument("--shard", required=True, help="a challenge-format shard (fineweb_val_*.bin)")
    ap.add_argument("--docs", type=int, default=None, help="check the first N documents only (default: all)")
    ap.add_argument("--show", type=int, default=5, help="mismatching documents to print (default: 5)")
    ap.add_argument("--sidecar", help="CaseOps: the val byte sidecar (default: fineweb_val_bytes_N.bin beside the shard)")
    args = ap.parse_args(argv)
    if args.docs is not None and args.docs < 1:
        ap.error("--docs must be at least 1")
    try:
        import sentencepiece as spm
        if not Path(args.tokenizer).is_file():
            raise T.RunError(f"--tokenizer {args.tokenizer!r}: file not found")
        sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
        if is_caseops(sp):
            rep, _ = check_caseops(sp, args.shard, args.sidecar, args.docs)
        else:
            rep = check(args.tokenizer, args.shard, args.docs)
    except T.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, counted, decoded, text in rep.mismatches[:args.show]:
        snippet = text if len(text) <= 80 else text[:77] + "..."
        print(f"mismatch: document {k}: counted {counted} bytes, decoded {decoded}: {snippet!r}")
    print(rep.summary())
    return 1 if rep.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())

"""CaseOps (`lossless_caps_caseops_v1`, records #1729 onward): capitals become operator characters, so the tokenizer
sees lowercase words, and every val token's bytes of the ORIGINAL text are counted exactly (the val byte sidecar).

The transform, over maximal runs of ASCII letters:
    lowercase word          unchanged                          "the"   -> "the"
    TitleCase word          TITLE + lower                      "The"   -> TITLE "the"   (a single capital too)
    ALLCAPS word (>= 2)     ALLCAPS + lower                    "NASA"  -> ALLCAPS "nasa"
    any other mix           TITLE if the first letter is a capital, then CAPNEXT before every later capital
                                                               "iPhone" -> "i" CAPNEXT "phone", "ABc" -> TITLE "a" CAPNEXT "bc"
    a literal operator      ESCAPE + that character            (anywhere in the text; it also ends a word)
Digits and every non-ASCII character are left alone and end a word ("A1B" is two words; "Ünïcode" keeps its Ü).

The operators are the private-use characters U+E001..U+E004, ids 4..7 of the CaseOps tokenizer (user-defined
symbols: each is always one whole token). decode() inverts encode() exactly and refuses any text encode() cannot
write. Bytes: every character of the transformed text stands for the same UTF-8 bytes in the original (a lowercase
letter for its capital is one byte for one), except the operators used as markers, which stand for none. So a
token's original bytes are its own bytes in the transformed text less 3 per marker it holds, with byte-fallback
tokens counting 1 each, as train_gpt.py counts them for any other tokenizer.

Sidecar layout (`fineweb_val_bytes_000000.bin`): the challenge's shard header (256 x int32: 20240520, 1, count) then
one uint16 per val token, parallel to the val stream; BOS and marker operators count 0.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESCAPE
BOS_ID = 1
SIDECAR_MAGIC, SIDECAR_VERSION, HEADER_INTS = 20240520, 1, 256

# encode: an ASCII word, or one literal operator (escaped)
_WORD_OR_OPERATOR = re.compile(f"[A-Za-z]+|[{OPERATORS}]")
# decode: an escaped operator | an ALLCAPS word | a word with optional TITLE and CAPNEXTs | a stray operator (refused)
_CODED = re.compile(f"{ESCAPE}[{OPERATORS}]|{ALLCAPS}[a-z]+|{TITLE}?[a-z](?:{CAPNEXT}?[a-z])*|[{OPERATORS}]")
_CAPNEXT_LETTER = re.compile(f"{CAPNEXT}([a-z])")


class CaseOpsError(ValueError):
    """Text that encode() cannot have written, or tokens whose bytes do not add up: the message names where."""


# ==================================================================================================
# The transform
# ==================================================================================================

def _encode_word(m: re.Match) -> str:
    word = m.group()
    if word[0] in OPERATORS:
        return ESCAPE + word
    if word.islower():
        return word
    lower = word.lower()
    if len(word) >= 2 and word.isupper():
        return ALLCAPS + lower
    head = TITLE if word[0].isupper() else ""     # TitleCase is the mix whose only capital is the first letter
    return head + lower[0] + "".join(CAPNEXT + c.lower() if c.isupper() else c for c in word[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text` (see the module doc)."""
    return _WORD_OR_OPERATOR.sub(_encode_word, text)


def _decode_word(m: re.Match) -> str:
    s = m.group()
    if len(s) == 1 and s in OPERATORS:
        raise CaseOpsError(f"operator U+{ord(s):04X} at character {m.start()} is not followed by what it marks")
    if s[0] == ESCAPE:
        return s[1]
    if s[0] == ALLCAPS:
        return s[1:].upper()
    title = s[0] == TITLE
    word = _CAPNEXT_LETTER.sub(lambda c: c.group(1).upper(), s[1:] if title else s)
    return word[0].upper() + word[1:] if title else word


def decode(text: str) -> str:
    """The text whose encode() is `text`; CaseOpsError if there is none (a stray or misplaced operator, a capital)."""
    out = _CODED.sub(_decode_word, text)
    if encode(out) != text:     # e.g. TITLE inside a word, ALLCAPS on one letter, an ASCII capital: not canonical
        bad = next((i for i, (a, b) in enumerate(zip(encode(out), text)) if a != b), min(len(out), len(text)))
        raise CaseOpsError(f"not a CaseOps text: encode(decode(text)) differs from it at character {bad}")
    return out


# ==================================================================================================
# Tokens and their original bytes
# ==================================================================================================

class PieceBytes:
    """Each token id's bytes in the transformed text, for one CaseOps tokenizer: control pieces (BOS) none,
    byte-fallback pieces their byte, others the piece with "▁" as a space. The unknown piece has no bytes to give."""

    def __init__(self, sp) -> None:
        self.unk_id = sp.unk_id()
        ids = [sp.piece_to_id(op) for op in OPERATORS]
        if sp.unk_id() in ids or len(set(ids)) != len(OPERATORS):
            raise CaseOpsError("not a CaseOps tokenizer: it does not hold the operators U+E001..U+E004 as pieces")
        if sp.normalize("a").startswith("\u2581"):
            raise CaseOpsError("a tokenizer that adds a dummy prefix (a leading \"▁\") is not supported: the CaseOps "
                               "tokenizer adds none, so every piece's text is the document's")
        self.operator_array, self.escape_id = np.array(ids, dtype=np.int64), ids[OPERATORS.index(ESCAPE)]
        self.pieces: list[bytes] = []
        for i in range(sp.vocab_size()):
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                self.pieces.append(b"")
            elif sp.is_byte(i):
                self.pieces.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                self.pieces.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
        self.lengths = np.array([len(p) for p in self.pieces], dtype=np.int64)

    def text(self, ids) -> str:
        """The transformed text of the ids (strict UTF-8: byte pieces must form whole characters)."""
        if self.unk_id in ids:
            raise CaseOpsError(f"token {list(ids).index(self.unk_id)} is the unknown piece: its text is lost")
        try:
            return b"".join(self.pieces[i] for i in ids).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaseOpsError(f"the byte pieces do not form UTF-8 text (byte {e.start} of the tokens' text)") from None

    def counts(self, ids) -> np.ndarray:
        """Each token's original UTF-8 bytes: its transformed bytes, 0 for an operator token used as a marker
        (the operator right after an ESCAPE marker is the literal character: its 3 bytes stay)."""
        ids = np.asarray(ids, dtype=np.int64)
        counts = self.lengths[ids].copy()
        escaped = -1      # the stream index an ESCAPE marker makes literal
        for k in np.flatnonzero(np.isin(ids, self.operator_array)).tolist():
            if k == escaped:
                continue
            counts[k] = 0
            if ids[k] == self.escape_id:
                escaped = k + 1
        return counts


def token_bytes(table: PieceBytes, ids, text: str, name: str = "document") -> np.ndarray:
    """Each of the ids' original UTF-8 bytes, where the ids are the tokens of encode(text) (no BOS). CaseOpsError
    naming the document unless the tokens give back encode(text) exactly and the bytes sum to len(text in UTF-8):
    a tokenizer that normalizes the text (drops a newline, NFKC) changes what is scored, see canonical_text."""
    coded, back = encode(text), table.text(ids)
    if back != coded:
        at = next((i for i, (a, b) in enumerate(zip(back, coded)) if a != b), min(len(back), len(coded)))
        raise CaseOpsError(f"{name}: its tokens do not give its text back: at character {at} of the CaseOps text "
                           f"{coded[at:at + 12]!r} came back as {back[at:at + 12]!r} (canonical_text first?)")
    counts = table.counts(ids)
    if int(counts.sum()) != len(text.encode("utf-8")):
        raise CaseOpsError(f"{name}: its tokens count {int(counts.sum())} bytes but it has {len(text.encode('utf-8'))}")
    return counts


def document_tokens(sp, text: str, name: str = "document", table: PieceBytes | None = None) -> tuple[list[int], np.ndarray]:
    """(ids, each id's original UTF-8 bytes) of one document with a CaseOps tokenizer, without BOS; CaseOpsError
    naming the document when they are not exact (see token_bytes)."""
    ids = sp.encode(encode(text))
    return ids, token_bytes(table or PieceBytes(sp), ids, text, name)


def canonical_text(sp, text: str) -> str:
    """The text as the tokenizer keeps it (its normalizer: NFKC, whitespace runs to one space, none at the ends),
    taken BEFORE the transform so that NFKC cannot make ASCII capitals the operators never marked ("Ⅻ" -> "XII").
    Repeated until stable (a literal "▁" reads as a space and may make a new run of spaces)."""
    for _ in range(8):
        norm = sp.normalize(text).replace("\u2581", " ")
        if norm == text:
            return text
        text = norm
    raise CaseOpsError(f"the tokenizer's normalizer does not settle on {text[:40]!r}")


# ==================================================================================================
# The val byte sidecar
# ==================================================================================================

@dataclass(frozen=True)
class Mismatch:
    document: int     # index of the document (its BOS) in the stream
    position: int     # stream index of the first token whose sidecar value differs from document_tokens' count
                      # (the document's BOS if every token agrees and only the total is wrong)
    expected: int     # the document's UTF-8 bytes: decode() of its tokens' transformed text
    found: int        # the sidecar's sum over the document's tokens (its BOS included)


def check_sidecar(tokens: np.ndarray, sidecar: np.ndarray, sp) -> Mismatch | None:
    """The first document whose sidecar sum is not the UTF-8 length of its text (the inverse transform of its
    decoded tokens), or None when every one agrees. CaseOpsError if the stream cannot be read (no leading BOS, a
    sidecar of another length, tokens that are no CaseOps text)."""
    tokens, sidecar = np.asarray(tokens, dtype=np.int64), np.asarray(sidecar, dtype=np.int64)
    if len(tokens) != len(sidecar):
        raise CaseOpsError(f"the sidecar has {len(sidecar)} entries but the stream has {len(tokens)} tokens")
    if len(tokens) == 0 or tokens[0] != BOS_ID:
        raise CaseOpsError(f"the stream must start with BOS (id {BOS_ID}): every document starts with one")
    table = PieceBytes(sp)
    starts = np.flatnonzero(tokens == BOS_ID)
    ends = np.append(starts[1:], len(tokens))
    for k, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
        ids = tokens[a + 1:b].tolist()
        try:
            text = decode(table.text(ids))
        except CaseOpsError as e:
            raise CaseOpsError(f"document {k} (tokens {a}..{b - 1}): {e}") from None
        expected, found = len(text.encode("utf-8")), int(sidecar[a:b].sum())
        if expected != found:
            ours = np.concatenate(([0], table.counts(ids)))
            differ = np.flatnonzero(ours != sidecar[a:b])
            return Mismatch(k, a + int(differ[0]) if len(differ) else a, expected, found)
    return None


def read_sidecar(path: Path) -> np.ndarray:
    """A sidecar's counts (uint16), after the header checks of any shard."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    size = Path(path).stat().st_size
    if len(header) < 3 or header[0] != SIDECAR_MAGIC or header[1] != SIDECAR_VERSION:
        raise CaseOpsError(f"{path}: not a shard (bad header)")
    if size != 4 * HEADER_INTS + 2 * int(header[2]):
        raise CaseOpsError(f"{path}: header says {int(header[2])} entries but the file has {size} bytes")
    return np.fromfile(path, dtype="<u2", count=int(header[2]), offset=4 * HEADER_INTS)

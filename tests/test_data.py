"""Shards: every malformed input is one clear error naming the file; ranks read disjoint spans."""
import numpy as np
import pytest

import train_gpt as T
from helpers import write_shard


def test_read_shard_round_trip(tmp_path):
    p = write_shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 6, 7, 1, 9])
    assert T.read_shard(p, 10).tolist() == [1, 5, 6, 7, 1, 9]


def test_bad_magic(tmp_path):
    p = write_shard(tmp_path / "s.bin", [1, 2], magic=1234)
    with pytest.raises(T.RunError, match=r"s\.bin: bad header \(magic 1234"):
        T.read_shard(p, 10)


def test_bad_version(tmp_path):
    p = write_shard(tmp_path / "s.bin", [1, 2], version=2)
    with pytest.raises(T.RunError, match="version 2"):
        T.read_shard(p, 10)


def test_size_disagrees_with_header(tmp_path):
    p = write_shard(tmp_path / "s.bin", [1, 2, 3], count=5)
    with pytest.raises(T.RunError, match=r"header says 5 tokens .* the file has 1030 bytes"):
        T.read_shard(p, 10)


def test_truncated_header(tmp_path):
    p = tmp_path / "s.bin"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(T.RunError, match="shorter than the 1024-byte shard header"):
        T.read_shard(p, 10)


def test_token_out_of_vocab(tmp_path):
    p = write_shard(tmp_path / "s.bin", [1, 2, 10])
    with pytest.raises(T.RunError, match=r"token id 10 >= VOCAB_SIZE=10"):
        T.read_shard(p, 10)


def test_missing_shards_name_the_pattern(tmp_path):
    with pytest.raises(T.RunError, match=r"no train shards match .*fineweb_train_\*\.bin"):
        T.shard_files(str(tmp_path), "train")


def test_stream_crosses_shards_and_wraps(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [0, 1, 2])
    write_shard(tmp_path / "fineweb_train_000001.bin", [3, 4])
    s = T.TokenStream(T.shard_files(str(tmp_path), "train"), 10)
    assert s.take(4).tolist() == [0, 1, 2, 3]
    assert s.take(4).tolist() == [4, 0, 1, 2]


def test_ranks_read_disjoint_consecutive_spans(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000) % 50)
    cfg, _ = T.config_from_env({"DATA_PATH": str(tmp_path), "VOCAB_SIZE": "50", "TRAIN_SEQ_LEN": "4"})
    spans = []
    for rank in range(2):
        loader = T.TrainLoader(cfg, T.Run(rank=rank, world_size=2), local_tokens=8)
        steps = [loader.next() for _ in range(2)]
        for x, y in steps:
            assert x.shape == (2, 4) and torch_equal(x.flatten()[1:], y.flatten()[:-1])
        spans.append([x.flatten().tolist() for x, _ in steps])
    # micro-step k: rank r reads tokens [(2k + r) * 9, (2k + r) * 9 + 8) of the stream
    for k in range(2):
        for r in range(2):
            start = (2 * k + r) * 9
            assert spans[r][k] == [(start + i) % 50 for i in range(8)]


def torch_equal(a, b):
    return bool((a == b).all())

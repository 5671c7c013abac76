import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import make_dataset  # noqa: E402

# The in-process tests use tiny tensors: one intra-op thread is faster and keeps float results reproducible.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(data_dir, tokenizer_model): made once per session, read-only for the tests."""
    return make_dataset(tmp_path_factory.mktemp("tiny"))

import os
import sys
from pathlib import Path

import pytest

# Test helper modules (tiny_models, dataset_writers, cache_fixtures, synthetic) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
# Never reach for the hub from a test: a missing model must fail at once, not after half a minute of retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from tiny_models import write_tiny_bert, write_tiny_dinov2

    root = tmp_path_factory.mktemp("models")
    return write_tiny_bert(root / "bert"), write_tiny_dinov2(root / "dinov2")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny training runs: on a shared 2-core machine two threads contending with other work are far slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium never reports usage (the browser tests pass the driver's path)
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: tests start server and llama.cpp processes beside this one, and on 2 cores
# oversubscribed OpenMP threads made tiny-model decoding ~30x slower (measured here).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    from tiny import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def trio():
    """base, expert, anti_expert: three different tiny random models over one vocabulary."""
    from tiny import tiny_model
    return tiny_model(0), tiny_model(1), tiny_model(2)

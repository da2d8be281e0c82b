from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _few_threads():
    # 2-core CI machine: oversubscribing threads makes the tiny models slower, not faster
    torch.set_num_threads(1)

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES260K = SHARED / "models" / "stories260k"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    if not (STORIES260K / "config.json").is_file():
        pytest.skip(f"shared model folder missing: {STORIES260K}")
    return STORIES260K

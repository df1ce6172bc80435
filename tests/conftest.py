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


def story_examples(model_path: Path, documents: int, seq_len: int, held_out: int):
    """(train, held-out) examples from the first ``documents`` stories of the stories260k samples."""
    import lolcats
    from lolcats.data import read_documents, split_held_out, tokenize_documents

    tokenizer = lolcats.load_tokenizer(str(model_path))
    stories = read_documents(SHARED / "data" / "stories260k_samples.txt")[:documents]
    return split_held_out(tokenize_documents(stories, tokenizer, seq_len), held_out, seed=0)

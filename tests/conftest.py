import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# The shared folder beside the clone (models and data too big for the repository); LOLCATS_SHARED points
# elsewhere, e.g. at a missing folder to see what a fresh clone without it runs.
SHARED = Path(os.environ.get("LOLCATS_SHARED") or Path(__file__).resolve().parents[2] / "shared")
STORIES260K = SHARED / "models" / "stories260k"

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def stories260k_path() -> Path:
    if not (STORIES260K / "config.json").is_file():
        pytest.skip(f"shared model folder missing: {STORIES260K}")
    return STORIES260K


@dataclass(frozen=True)
class TinyFiles:
    """What ``tiny_artifacts.build`` wrote: a model folder (teacher + tokenizer) and two text files."""

    model: Path  # Hugging Face folder: config.json, model.safetensors, tokenizer.json, ...
    train: Path  # 400 stories separated by blank lines
    eval: Path  # 40 other stories, for --eval-text


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyFiles:
    """The tiny teacher, its tokenizer and corpus, built once per session (no ../shared needed)."""
    import tiny_artifacts

    folder = tiny_artifacts.build(tmp_path_factory.mktemp("tiny"))
    return TinyFiles(model=folder / "tiny-llama", train=folder / "train.txt", eval=folder / "eval.txt")


def tiny_examples(files: TinyFiles, documents: int, seq_len: int, held_out: int):
    """(train, held-out) examples from the first ``documents`` stories of the tiny corpus."""
    return _examples(files.model, files.train, documents, seq_len, held_out)


def story_examples(model_path: Path, documents: int, seq_len: int, held_out: int):
    """(train, held-out) examples from the first ``documents`` stories of the stories260k samples."""
    return _examples(model_path, SHARED / "data" / "stories260k_samples.txt", documents, seq_len, held_out)


def _examples(model_path: Path, data: Path, documents: int, seq_len: int, held_out: int):
    import lolcats
    from lolcats.data import read_documents, split_held_out, tokenize_documents

    tokenizer = lolcats.load_tokenizer(str(model_path))
    stories = read_documents(data)[:documents]
    return split_held_out(tokenize_documents(stories, tokenizer, seq_len), held_out, seed=0)

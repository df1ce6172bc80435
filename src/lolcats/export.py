"""`lolcats export`: a linearized output folder -> a standalone Hugging Face model folder.

The folder holds the base model's config (plus ``auto_map`` and a ``lolcats`` block), safetensors weights
(base + feature maps + γ, with LoRA merged into the projections; or, with ``keep_lora_adapter``, kept as a peft
adapter in ``lora/``, and then loading the folder warns that it is not applied), the tokenizer, a model card,
and the modeling code: a ``LolcatsForCausalLM`` that subclasses the base model's transformers class and
swaps its attention at construction, plus lolcats' own runtime files (lolcats/runtime: swap, attention,
cache, feature maps, families, ops) copied verbatim beside it. Those depend on torch and transformers only, so
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` works without lolcats installed,
and the exported model computes with exactly the code ``lolcats.load`` uses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from .version import __version__
from .artifacts import ArtifactError, atomic_write_json, load, read_manifest, shareable, tokenizer_for
from .convert import lora_parameters, merge_lora as fold_lora

RUNTIME = Path(__file__).parent / "runtime"
ALLOWED_IMPORTS = {"torch", "transformers"}  # besides the standard library and the copied files
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_RELATIVE_IMPORT = re.compile(r"^\s*from \.([\w.]*) import", re.MULTILINE)
_ABSOLUTE_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", re.MULTILINE)

MODELING_TEMPLATE = '''"""A linearized {base_class} (LoLCATs), exported by lolcats {version}.

Needs torch and transformers only. Each converted layer's softmax attention is replaced by lolcats'
hybrid attention (softmax over a recent window + linear attention over older tokens, with learned
feature maps); `generate()` keeps a constant-size cache for those layers. The other .py files
beside this one are lolcats' own runtime code (lolcats/runtime), copied unchanged.
"""

import os
import warnings
from types import SimpleNamespace

from transformers import {base_class}

from .swap import swap_attention
{runtime_imports}


class LolcatsForCausalLM({base_class}):
    # The learned feature maps, decay gates and γ stay fp32 when the model is loaded in bf16/fp16.
    _keep_in_fp32_modules_strict = ["feature_map_q", "feature_map_k", "decay_gate", "window_logit"]

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        swap_attention(self, SimpleNamespace(**config.lolcats["conversion"]))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        lora = (getattr(model.config, "lolcats", None) or {{}}).get("lora")
        if lora and not lora.get("merged", True):
            warnings.warn(unmerged_lora_message(str(pretrained_model_name_or_path), kwargs.get("subfolder") or ""),
                          UserWarning, stacklevel=2)
        return loaded


def unmerged_lora_message(folder, subfolder=""):
    """The warning for a folder exported with its LoRA kept as a separate peft adapter (`lora/`)."""
    local = os.path.join(folder, subfolder) if subfolder else folder
    if os.path.isdir(local):
        where = os.path.join(local, "lora")
        how = f"PeftModel.from_pretrained(model, {{where!r}})"
    else:  # a Hub repository
        where = f"{{folder}} (subfolder {{os.path.join(subfolder, 'lora')!r}})"
        how = f"PeftModel.from_pretrained(model, {{folder!r}}, subfolder={{os.path.join(subfolder, 'lora')!r}})"
    return (f"This linearized model was exported with its LoRA kept as a separate peft adapter in {{where}}, and "
            f"from_pretrained does not apply it: the model you loaded is NOT the trained one (its outputs differ). "
            f"Apply the adapter (needs peft): `from peft import PeftModel; model = {{how}}`, or re-export without "
            f"--keep-lora-adapter to get a folder with LoRA merged.")
'''


def runtime_sources() -> dict[str, str]:
    """File name -> source of every runtime module (lolcats/runtime/*.py), exactly as in the package: they
    import each other with single-dot relative imports only, the one form transformers' remote-code loader
    follows, so the exported folder holds them verbatim.

    Refuses (ValueError) if any imports a third-party package other than torch and transformers, or imports
    its way out of the runtime folder.
    """
    sources = {}
    for path in sorted(RUNTIME.glob("*.py")):
        if path.name == "__init__.py":
            continue
        source = path.read_text()
        third_party = {m for m in _ABSOLUTE_IMPORT.findall(source)
                       if m not in sys.stdlib_module_names and m != "__future__"} - ALLOWED_IMPORTS
        if third_party:
            raise ValueError(f"lolcats/runtime/{path.name} imports {sorted(third_party)}: exported code may use only "
                             "torch and transformers")
        for module in _RELATIVE_IMPORT.findall(source):
            if module.startswith(".") or not (RUNTIME / f"{module}.py").is_file():
                raise ValueError(f"lolcats/runtime/{path.name} imports .{module}: runtime modules may import only "
                                 "their siblings in lolcats/runtime")
        sources[path.name] = source
    return sources


def export(
    directory: str | Path,
    out: str | Path,
    *,
    keep_lora_adapter: bool = False,
    dtype: str | None = None,
    base_model: str | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Write the standalone folder for the linearized model in ``directory`` to ``out`` (which must not exist
    or be empty). Everything is written to a temporary folder beside ``out`` and moved into place at the end.

    LoRA is merged into the projections and the weights keep the dtype the run was trained in (``dtype``
    overrides it), so ``from_pretrained(out)`` is the model ``lolcats.load(directory)`` gives. ``keep_lora_adapter=True`` keeps it as a peft adapter in ``out/lora`` instead: the folder alone is then
    the model without LoRA, and loading it warns (naming the adapter and how to apply it)."""
    directory, out = Path(directory), Path(out)
    manifest = read_manifest(directory)
    dtype = dtype or manifest.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; export into a new folder")
    lora = manifest.get("lora")
    model = load(directory, base_model=base_model, merge=False)  # in the dtype it was trained in
    keep = bool(lora) and keep_lora_adapter
    lora_tensors = {name: p.detach().clone() for name, p in lora_parameters(model).items()} if keep else {}
    if lora:
        fold_lora(model, merge=not keep)
    model.to(DTYPES[dtype])
    tokenizer = tokenizer_for(str(directory))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        config = model.config
        config.lolcats = {
            "format_version": 1,
            "lolcats_version": __version__,
            "conversion": manifest["conversion"],
            "lora": None if not lora else {**lora, "merged": not keep},
        }
        config.auto_map = {"AutoModelForCausalLM": "modeling_lolcats.LolcatsForCausalLM"}
        model.save_pretrained(staging, safe_serialization=True)
        _rewrite_config(staging / "config.json")
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_config(staging / "tokenizer_config.json")
        base_class = type(model).__name__
        runtime = runtime_sources()
        (staging / "modeling_lolcats.py").write_text(modeling_code(base_class, runtime))
        for name, source in runtime.items():
            (staging / name).write_text(source)
        if keep:
            _save_peft_adapter(staging / "lora", lora, lora_tensors, dtype)
        (staging / "README.md").write_text(model_card(manifest, base_class, not keep, dtype))
        _refuse_local_paths(staging, [directory, Path(manifest["base_model"]["spec"]), Path.cwd(), Path.home()])
        for path in [staging, *staging.rglob("*")]:  # mkdtemp and safetensors' temp file leave owner-only modes
            shareable(path)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = folder_bytes(out)
    echo(f"exported {base_class} -> LolcatsForCausalLM ({dtype}, LoRA "
         f"{'kept in lora/, NOT applied by from_pretrained' if keep else 'merged' if lora else 'none'}) to {out}: "
         f"{size / 2**20:.1f} MiB")
    return out


def modeling_code(base_class: str, runtime: dict[str, str]) -> str:
    # transformers < 5 copies only the direct relative imports of a local folder's modeling file into its
    # module cache, so the modeling file names every runtime file itself.
    imports = "\n".join(f"from .{name[:-3]} import __name__ as _{name[:-3]}  # noqa: F401"
                         for name in sorted(runtime) if name != "swap.py")
    return MODELING_TEMPLATE.format(base_class=base_class, version=__version__, runtime_imports=imports)


def _rewrite_config(path: Path) -> None:
    config = json.loads(path.read_text())
    config["architectures"] = ["LolcatsForCausalLM"]
    config.pop("_name_or_path", None)
    atomic_write_json(path, config)


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 names its generic fast tokenizer TokenizersBackend; 4.x knows it as PreTrainedTokenizerFast
    (still an alias in 5.x), so the folder uses the name both read."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_json(path, config)


def _save_peft_adapter(folder: Path, lora: dict, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """The LoRA factors in peft's own format: PeftModel.from_pretrained(model, folder) adds them back."""
    targets = sorted({name.split(".lora_")[0].replace(".base_layer", "") for name in tensors})
    LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora.get("dropout", 0.0), bias="none",
               target_modules=targets, task_type="CAUSAL_LM").save_pretrained(str(folder))
    renamed = {"base_model.model." + name.replace(".default.", "."): t.to(DTYPES[dtype]).contiguous()
               for name, t in tensors.items()}
    save_file(renamed, str(folder / "adapter_model.safetensors"))


def _refuse_local_paths(folder: Path, paths: list[Path]) -> None:
    """No absolute path of the exporting machine may end up in the folder (tokenizer configs can carry one)."""
    needles = sorted({str(p.resolve()) for p in paths if str(p) not in ("", ".")}, key=len, reverse=True)
    for file in folder.rglob("*"):
        if not file.is_file() or file.suffix not in (".json", ".md", ".py", ".txt", ".jinja"):
            continue
        text = file.read_text()
        found = [n for n in needles if n in text]
        if found:
            raise ArtifactError(f"export would leak the local path {found[0]!r} into {file.name}")


def _short(spec: str) -> str:
    """A base model spec without the exporting machine's directories."""
    path = Path(spec)
    return path.name if path.is_absolute() or len(path.parts) > 1 else spec


def model_card(manifest: dict, base_class: str, merged: bool, dtype: str) -> str:
    base = manifest["base_model"]
    conversion = manifest["conversion"]
    run = manifest.get("run", {})
    stages = manifest.get("stages", {})
    lora = manifest.get("lora")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [lolcats, linear-attention, linearized]",
        "---",
        f"# {_short(base['spec'])}, linearized with lolcats",
        "",
        f"A linearized version of **{_short(base['spec'])}** ({base_class}; config sha256 "
        f"`{base['config_sha256'][:16]}`, weights sha256 `{base['weights_sha256'][:16]}`), made with lolcats "
        f"{__version__} (LoLCATs: attention transfer, then LoRA). Weights: {dtype}; LoRA "
        f"{'merged into the projections' if merged else 'kept as a peft adapter in `lora/`' if lora else 'not used'}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)",
        "tokenizer = AutoTokenizer.from_pretrained(FOLDER)",
        "out = model.generate(**tokenizer('Once upon a time', return_tensors='pt'), max_new_tokens=50)",
        "```",
    ]
    if lora and not merged:
        lines += [
            "",
            "**The LoRA adapter is not merged:** it is kept as a peft adapter in `lora/`, and `from_pretrained(FOLDER)`",
            "alone loads the model WITHOUT it (a different model from the one measured below; loading warns). Apply it",
            "(needs peft): `model = PeftModel.from_pretrained(model, FOLDER + '/lora')`.",
        ]
    lines += [
        "",
        "Needs torch and transformers only (lolcats not required). Generation keeps a constant-size cache for",
        "the linearized layers.",
        "",
        "## Recipe",
        "",
        f"- attention: `{conversion['attention']}`, feature map `{conversion['feature_map']}` (dim "
        f"{conversion['feature_dim']}), softmax window {conversion['window']} tokens; layers kept as softmax: "
        f"{conversion['softmax_layers'] or 'none'}; local layers: {conversion['local_layers']}",
    ]
    for name, label in (("stage1", "stage 1 (attention transfer)"), ("stage2", "stage 2 (LoRA)")):
        if name in stages:
            s = stages[name]
            lines.append(f"- {label}: {s['tokens']:,} tokens, {s['steps']} steps, best held-out loss "
                         f"{s['best_eval_loss']:.4g} (from {s['first_eval_loss']:.4g})")
    if lora:
        lines.append(f"- LoRA: rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['targets'])}")
    files = [Path(f).name for f in manifest.get("data", {}).get("files", [])]
    if files:
        lines.append(f"- data: {', '.join(files)} ({manifest['data'].get('train_tokens', 0):,} training tokens); "
                     f"seq_len {run.get('seq_len')}, seed {run.get('seed')}")
    perplexity = manifest.get("metrics", {}).get("perplexity", {})
    if perplexity:
        lines += ["", "## Measured gap", "", "| text | teacher ppl | linearized ppl | ratio |", "|---|---|---|---|"]
        for path, row in perplexity.items():
            lines.append(f"| {Path(path).name} | {row['teacher']:.3f} | {row['linearized']:.3f} | ×{row['ratio']:.4f} |")
    lines += ["", f"Versions at training: {json.dumps(manifest.get('versions', {}))}", ""]
    return "\n".join(lines)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


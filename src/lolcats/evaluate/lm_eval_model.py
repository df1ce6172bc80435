"""lm-evaluation-harness integration: a ``lolcats`` model type for the harness's own CLI and ``simple_evaluate``.

Importing this module registers the model type (it needs ``lm_eval`` installed: ``pip install 'lolcats[eval]'``).
``pretrained`` takes a linearized output folder or any base model lolcats loads (folder, hub id, .gguf,
'gemma3-270m'). Scoring goes through ``lolcats.evaluate.scoring``, the same code as ``lolcats eval``.
"""

from __future__ import annotations

import sys
import warnings

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..artifacts import load_model, tokenizer_for
from .scoring import encode, encode_pair, model_max_length, rolling_loglikelihood, score_token_pairs


@register_model("lolcats")
class LolcatsLM(LM):
    def __init__(self, pretrained: str, batch_size: int | str = 8, max_length: int | None = None,
                 device: str | None = None, **_ignored) -> None:
        super().__init__()
        self.tokenizer = tokenizer_for(pretrained)
        self.model = load_model(pretrained)
        # lm-eval's CLI passes device="cuda" unless told otherwise; on a machine without CUDA stay on the CPU.
        if device and (not str(device).startswith("cuda") or torch.cuda.is_available()):
            self.model.to(device)
        elif device:
            warnings.warn(f"device {device!r} is not available here; scoring on the CPU", stacklevel=2)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_length = int(max_length) if max_length else model_max_length(self.model)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *request.args) for request in requests]
        scores = score_token_pairs(self.model, pairs, batch_size=self.batch_size, max_length=self.max_length)
        return [(score.loglikelihood, score.is_greedy) for score in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            ids = encode(self.tokenizer, request.args[0])
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
            total, _ = rolling_loglikelihood(self.model, [start] + ids, seq_len=self.max_length, batch_size=self.batch_size)
            results.append(total)
        return results

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, settings = request.args
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = settings.get("max_gen_toks", 256)
            context_ids, _ = encode_pair(self.tokenizer, context, " ")
            ids = torch.tensor([context_ids[-self.max_length:]], device=next(self.model.parameters()).device)
            sampling = bool(settings.get("do_sample")) and float(settings.get("temperature", 0) or 0) > 0
            extra = {"temperature": settings["temperature"]} if sampling else {"temperature": None, "top_p": None, "top_k": None}
            generated = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                            do_sample=sampling, pad_token_id=self.tokenizer.eos_token_id, **extra)
            text = self.tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def run_harness_cli(model: str, harness_args: list[str]) -> None:
    """Run lm-eval's own command line with ``--model lolcats --model_args pretrained=MODEL`` put in front."""
    from lm_eval.__main__ import cli_evaluate

    if any(arg in ("--model", "-M", "--model_args", "-a") for arg in harness_args):
        raise ValueError("pass the model with lolcats' --model; --model/--model_args are set by `lolcats lm-eval`")
    sys.argv = ["lm-eval", "run", "--model", "lolcats", "--model_args", f"pretrained={model}", *harness_args]
    cli_evaluate()

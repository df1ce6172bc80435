"""A tiny teacher model, its tokenizer and a text corpus, built by the tests (no files from ../shared).

``build(folder)`` writes, deterministically and in two to three seconds:
  tiny-llama/  a byte-level BPE tokenizer (``tokenizers``, trained on the corpus: 512 ids, <unk> <s> </s> <pad>
               = 0 1 2 3, BOS prepended like stories260k's) and a grouped-query Llama (4 layers, hidden 32,
               4 query / 2 key-value heads of 8, tied embeddings) in safetensors: a Hugging Face folder that
               ``lolcats.load_base_model`` / ``load_tokenizer`` and ``AutoModelForCausalLM`` / ``AutoTokenizer`` load;
  train.txt    400 templated children's stories separated by blank lines (the ``.txt`` format of ``lolcats.data``),
               143 to 478 tokens each (120k in all): most are longer than two 64-token windows, so the linear
               term of a converted layer is in use (stage 1 has nothing to learn from shorter rows);
  eval.txt     40 more stories of the same grammar (another seed), for ``--eval-text``.

The teacher is a language model of the corpus, not random weights: 200 AdamW steps (about two seconds on an idle
core) take its loss from ln(512) = 6.2 to about 1 nat (perplexity ~2.6 on eval.txt), so its attention has
patterns worth imitating (stage 1), its perplexity means something and greedy decoding continues a story in
the corpus' words ("... there was a little sad frog named Max. The frog said, ..."), not one repeated token.
Query and key projections start at std 0.1 (Llama's 0.02 makes every attention row nearly uniform at this
width). Everything is seeded and built on one thread, so a machine builds the same bytes every time.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

TRAIN_DOCUMENTS = 400
EVAL_DOCUMENTS = 40
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0, 1, 2, 3 (as stories260k: <unk> 0, <s> 1, </s> 2)
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, rope_theta=10000.0,
              tie_word_embeddings=True)
QK_STD = 0.1  # query/key projection init (Llama's 0.02 gives nearly uniform attention rows at hidden 32)

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna", "Max", "Sue", "Tim", "Zoe", "Jack", "Emma"]
ANIMALS = ["cat", "dog", "bird", "fish", "frog", "bunny", "duck", "bear", "mouse", "fox"]
THINGS = ["ball", "kite", "box", "hat", "car", "boat", "book", "cake", "drum", "toy", "cup", "tree"]
ADJECTIVES = ["big", "small", "red", "blue", "happy", "sad", "shiny", "soft", "old", "funny", "green", "tall"]
PLACES = ["park", "garden", "house", "forest", "river", "school", "beach", "hill", "farm", "shop"]
VERBS = ["play", "run", "jump", "sing", "read", "swim", "dance", "draw", "hide", "climb"]
FEELINGS = ["happy", "sad", "scared", "proud", "tired", "excited", "surprised", "calm"]
OPENINGS = [
    "Once upon a time, there was a little {adj} {animal} named {name}.",
    "One day, {name} went to the {place} with a {adj} {thing}.",
    "There was a {adj} {thing} in the {place}, and {name} wanted it.",
]
MIDDLES = [
    "{name} liked to {verb} in the {place} every day.",
    "{name} saw a {adj} {animal} near the {thing}.",
    "The {animal} said, \"Can I {verb} with your {thing}?\"",
    "{name} and the {animal} went to the {place} to {verb}.",
    "The {thing} was very {adj}, so {name} felt {feeling}.",
    "{name} asked, \"Why is the {animal} so {feeling}?\"",
    "They looked for the {thing} under the {adj} tree.",
    "Suddenly, the {animal} began to {verb} and {verb2}.",
    "\"I love my {adj} {thing}!\" said {name}.",
    "Mom said, \"Be careful in the {place}, {name}.\"",
]
ENDINGS = [
    "In the end, {name} and the {animal} were friends.",
    "{name} went home and felt {feeling}.",
    "From that day on, {name} always shared the {thing}.",
    "The {animal} smiled, and they played until night.",
]


def story(rng: random.Random) -> str:
    """One story: an opening, 10 to 36 middle sentences (some on a new line, as in TinyStories), an ending."""
    slots = dict(name=rng.choice(NAMES), animal=rng.choice(ANIMALS), thing=rng.choice(THINGS),
                 place=rng.choice(PLACES))

    def sentence(template: str) -> str:
        return template.format(adj=rng.choice(ADJECTIVES), verb=rng.choice(VERBS), verb2=rng.choice(VERBS),
                               feeling=rng.choice(FEELINGS), **slots)

    parts = [sentence(rng.choice(OPENINGS))]
    for _ in range(rng.randint(10, 36)):
        parts.append(("\n" if rng.random() < 0.2 else " ") + sentence(rng.choice(MIDDLES)))
    parts.append(" " + sentence(rng.choice(ENDINGS)))
    return "".join(parts)


def corpus(documents: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(story(rng) for _ in range(documents)) + "\n"


def build_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # add_special_tokens=True (the default of a plain tokenizer(...) call) prepends BOS, like stories260k
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>", model_max_length=CONFIG["max_position_embeddings"])


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **CONFIG)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.copy_(QK_STD * torch.randn(proj.weight.shape, generator=generator))
    return model.eval()


TEACHER_STEPS = 200
TEACHER_LR = 1e-2
TEACHER_ROWS, TEACHER_LEN = 8, 128


def train_teacher(model, tokenizer, text: str, steps: int = TEACHER_STEPS, seed: int = 0):
    """``steps`` AdamW steps of next-token loss on random 128-token rows of the BOS-joined documents."""
    ids = []
    for document in text.split("\n\n"):
        ids += [tokenizer.bos_token_id] + tokenizer(document, add_special_tokens=False).input_ids
    rows = torch.tensor(ids[: len(ids) // TEACHER_LEN * TEACHER_LEN]).view(-1, TEACHER_LEN)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=TEACHER_LR, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        batch = rows[torch.randint(0, rows.shape[0], (TEACHER_ROWS,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def build(folder: str | Path) -> Path:
    """Write tiny-llama/, train.txt and eval.txt under ``folder``; returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train, held = corpus(TRAIN_DOCUMENTS, seed=0), corpus(EVAL_DOCUMENTS, seed=1)
    (folder / "train.txt").write_text(train, encoding="utf-8")
    (folder / "eval.txt").write_text(held, encoding="utf-8")
    tokenizer = build_tokenizer(train.split("\n\n"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order on every run
    try:
        model = train_teacher(build_model(len(tokenizer)), tokenizer, train)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(folder / "tiny-llama")  # model.safetensors
    tokenizer.save_pretrained(folder / "tiny-llama")
    return folder

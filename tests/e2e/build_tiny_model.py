"""Build a tiny random Qwen2 model, its tokenizer and a chat data set, fully offline.

Run with the Python of the ms-swift environment (it has torch, transformers and tokenizers):

    .swift-venv/bin/python tests/e2e/build_tiny_model.py OUT_DIR

Writes OUT_DIR/tiny-qwen2 (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with a
ChatML chat_template) and OUT_DIR/data.jsonl (rows of {"messages": [user, assistant]}), which is what
`swift sft --model_type qwen2 --template qwen2_5` needs from a custom local model
(see ../shared/fixtures/swift/README.txt). Deterministic: the same seed gives the same files.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

# Never touch a model hub: everything is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 1234
VOCAB_SIZE = 4000
ROWS = 50
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

WORDS = (
    "the a one two three four five six seven eight nine ten red green blue cat dog bird fish tree river "
    "mountain city train model data loss step learn small large fast slow bright dark warm cold north south "
    "east west apple bread water light sound paper stone cloud rain snow wind summer winter morning evening "
    "count add number answer question tell me what is how many please say hello hi thanks good yes no"
).split()


def sentences(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!"]))
    return out


SYLLABLES = (
    "ka ko ki ru ra ne no ma mi mo ta te to sa shi su la le lo pa pe po ba be bo da de do ga go "
    "zen val mor tik qua fen dor lin sar wex yor han pil cur"
).split()


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    """Made-up words: enough distinct byte pairs for the BPE trainer to fill its vocabulary."""
    lines = []
    for _ in range(n):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(5, 12))]
        lines.append(" ".join(words))
    return lines


def chat_rows(rng: random.Random, n: int) -> list[dict[str, list[dict[str, str]]]]:
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        if i % 2 == 0:
            user = f"What is {a} plus {b}?"
            assistant = f"{a} plus {b} is {a + b}."
        else:
            user = f"Tell me about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."
            assistant = " ".join(sentences(rng, 2))
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]})
    return rows


def build_tokenizer(rng: random.Random, corpus: list[str]):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, special in enumerate(SPECIALS):
        assert tok.token_to_id(special) == i, (special, tok.token_to_id(special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def main(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = out_dir / "tiny-qwen2"

    rows = chat_rows(rng, ROWS)
    corpus = sentences(rng, 3000) + pseudo_words(rng, 6000)
    corpus += [m["content"] for r in rows for m in r["messages"]]
    corpus += [f"{i} plus {j} is {i + j}." for i in range(0, 101, 3) for j in range(0, 101, 7)]
    corpus += ["user", "assistant", "system", "\n"] * 50

    tokenizer = build_tokenizer(rng, corpus)
    vocab_size = len(tokenizer)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        max_window_layers=2,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
        torch_dtype="float32",
    )
    config.architectures = ["Qwen2ForCausalLM"]
    model = Qwen2ForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, max_new_tokens=64)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)

    with open(out_dir / "data.jsonl", "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")

    # Preference rows for DPO, as ms-swift reads them: the chat plus a rejected answer (rlhf_dpo.dataset_head).
    with open(out_dir / "pref.jsonl", "w", encoding="utf-8") as fh:
        for row in rows[:20]:
            rejected = " ".join(rng.choice(WORDS) for _ in range(6)) + "."
            fh.write(json.dumps({**row, "rejected_response": rejected}) + "\n")

    params = sum(p.numel() for p in model.parameters())
    print(f"tiny-qwen2: vocab {vocab_size}, {params / 1e6:.2f} M parameters -> {model_dir}")
    print(f"data: {len(rows)} rows -> {out_dir / 'data.jsonl'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    main(Path(sys.argv[1]).resolve())

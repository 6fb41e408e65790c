"""Build a tiny Llama model and tokenizer locally, for tests, examples and benchmarks (no hub access needed).

`make_tiny_model(out_dir)` trains a byte-level BPE tokenizer on the bundled sample data (data/sample/), gives it
bos/eos/pad and a ChatML chat template with `{% generation %}` markers (so assistant spans can be found), and saves
a randomly initialised `LlamaForCausalLM` next to it. Same arguments, same seed -> identical files. Takes ~1-2 s.

    python -m dtrain.tiny OUT [--hidden 64 --layers 2 --heads 4 --kv-heads 2 --intermediate 128 --vocab 512]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"
BOS, EOS, PAD, IM_START, IM_END = "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4 in this order

# ChatML. The bos token opens the conversation; each assistant reply plus its <|im_end|> sits inside
# {% generation %} so `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly what is trained.
# Tool definitions go into a system block first; an assistant's tool calls follow its text as <tool_call>{json}
# </tool_call> (trained, inside the markers); tool results are messages of role tool.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}{{ '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] }}"
    "{%- for call in message['tool_calls'] or [] %}"
    "{{ '<tool_call>' }}{{ (call['function'] if call['function'] is defined else call) | tojson }}{{ '</tool_call>' }}"
    "{%- endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def sample_corpus(sample_dir: Path = SAMPLE_DIR) -> list[str]:
    """Every piece of text in the bundled sample files (text, instructions, chat messages), in file order."""
    texts: list[str] = []
    for name in ("text.jsonl", "instruction.jsonl", "chat.jsonl"):
        path = sample_dir / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: bundled sample data missing (run data/sample/generate.py)")
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if "text" in row:
                texts.append(row["text"])
            elif "messages" in row:
                texts += [m["content"] for m in row["messages"]]
            else:
                texts += [row["instruction"], row["input"], row["output"]]
    return texts


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE `PreTrainedTokenizerFast`; no post-processor, so callers add bos/eos explicitly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write tokenizer + random-init LlamaForCausalLM (safetensors) to out_dir; returns out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(sample_corpus() if corpus is None else corpus, vocab_size)
    tokenizer.save_pretrained(out)
    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=max(vocab_size, len(tokenizer)),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # A private generator state would be nicer, but HF init draws from the global RNG; restore it afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dtrain.tiny", description="Write a tiny Llama + tokenizer.")
    parser.add_argument("out")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = make_tiny_model(
        args.out,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        seed=args.seed,
    )
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    print(f"{out}  parameters={params:,}")


if __name__ == "__main__":
    main()

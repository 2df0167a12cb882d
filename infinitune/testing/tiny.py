"""Small real artefacts for tests and benchmarks on a machine without the hub: a byte-level BPE tokenizer
trained here, with a ChatML template, whose pad and eos share an id as in SmolLM2 and Llama."""

from __future__ import annotations

from pathlib import Path

from infinitune.data_pipeline import synthetic

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus(n: int):
    for rec in synthetic.stream(seed=12345, start=0):
        if n <= 0:
            return
        n -= 1
        yield " ".join([rec["instruction"], rec["input"], rec["output"]])
    yield "The quick brown fox jumps over the lazy dog. Hello, world! 0123456789"


def train_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512, chat_template: str | None = CHATML_TEMPLATE):
    """Train a byte-level BPE tokenizer on synthetic tasks, save it to `out_dir` and return it.

    Every byte is in the vocabulary, so any text (any language, any bytes) can be tokenised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(2000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",  # pad == eos, the trap masking-by-id falls into
        unk_token="<|endoftext|>",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(out_dir))
    return fast


def save_tiny_llama(
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 1024,
    seed: int = 0,
    tie_embeddings: bool = False,
) -> Path:
    """A small Llama built from a config (random weights) saved as a complete HF model directory, with the
    tokenizer beside it (trained here when none is given)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir else train_tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_embeddings,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out

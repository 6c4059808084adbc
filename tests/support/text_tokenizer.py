"""A tiny word-level Hugging Face tokenizer with bos/eos/pad and a chat template, built by the tests
that export a model with its tokenizer (tests/test_tokenizer_export.py, tests/serve/test_text.py)."""

from __future__ import annotations

from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]  # ids 0..5
PAD, BOS, EOS = 0, 1, 2
WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "hello", "world", "how", "are", "you", "?"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def vocabulary(size: int = 120) -> list:
    """The tokens of a ``size``-id tokenizer: the specials, WORDS, then filler words ``w0``, ``w1``, ...
    (every id a model of that vocabulary can generate decodes to a word)."""
    return SPECIALS + WORDS + [f"w{i}" for i in range(size - len(SPECIALS) - len(WORDS))]


def save_tokenizer(path, size: int = 120, chat_template=CHAT_TEMPLATE) -> Path:
    """Save the tokenizer as transformers saves one (``save_pretrained``): `vocabulary` (pad 0,
    bos 1, eos 2, the chat markers, then words); every encoded text starts with bos. Returns ``path``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(vocabulary(size))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"])
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return Path(path)

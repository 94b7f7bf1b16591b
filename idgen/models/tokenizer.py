"""Offline CLIP and T5 tokenizers with tiny vocabularies (tests and the tiny models)."""

from __future__ import annotations

from typing import Any

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

# Whole-word merges for the words that prompts in tests and the demo use, so they
# become single tokens as in the real CLIP vocabulary; anything else falls back to bytes.
_WORDS = (
    "a photo of the an in on with and shape shapes circle square triangle red green blue yellow "
    "dark light background domain face faces animal porcelain man woman wearing glasses smiling "
    "old young cat dog style painting sketch"
).split()


def _word_merges(word: str) -> list[tuple[str, str]]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    current = symbols[0]
    for nxt in symbols[1:]:
        merges.append((current, nxt))
        current = current + nxt
    return merges


def build_tiny_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP tokenizer with SD1.5's special tokens and padding, built without any download."""
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in byte_chars:
        vocab[c] = len(vocab)
    for c in byte_chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        for a, b in _word_merges(word):
            if (a, b) in merges:
                continue
            merges.append((a, b))
            vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # transformers 5 ignores vocab_file/merges_file kwargs: pass the objects themselves.
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=model_max_length,
        pad_token="<|endoftext|>",
    )


def build_tiny_t5_tokenizer(model_max_length: int = 256) -> Any:
    """A T5 tokenizer (SentencePiece-style unigram, T5's ``<pad>``/``</s>``/``<unk>``) over the
    same prompt words plus single letters, built without any download."""
    from transformers import T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -1.0 - i / 100) for i, w in enumerate(dict.fromkeys(_WORDS))]
    vocab += [("\u2581", -15.0)] + [(c, -20.0) for c in letters]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)

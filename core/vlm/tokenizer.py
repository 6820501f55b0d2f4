"""Word-level tokenizer of the base VLM, built with the `tokenizers` library.

The suite's language is a closed set of template words, so one token per word keeps sequences short
(the decoder's cost is per token) and answers are still multi-token ("lamp bird" -> 2 tokens + EOS).
It is wrapped as a transformers `PreTrainedTokenizerFast` and saved as `tokenizer.json` next to the
model weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, ANSWER = "[PAD]", "[UNK]", "[BOS]", "[EOS]", "[ANS]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS, ANSWER)


def build_word_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A lower-casing, whitespace/punctuation-splitting word tokenizer over `words` plus special tokens.

    Token ids: the special tokens first (PAD=0, UNK=1, BOS=2, EOS=3, ANS=4), then `words` sorted.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(w.lower() for w in words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=[ANSWER],
    )


def load_word_tokenizer(directory: Path | str) -> PreTrainedTokenizerFast:
    """The tokenizer saved by `PreTrainedTokenizerFast.save_pretrained(directory)`."""
    return PreTrainedTokenizerFast.from_pretrained(str(directory))

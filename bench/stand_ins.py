"""Encoders for machines without the bundled MiniLM (the GPU machine's image): a WordPiece tokenizer made from a
generated vocabulary, and a BERT of all-MiniLM-L6-v2's shapes with random weights (its cost, not its features).

The vocabulary has BERT-uncased's size (30522) and special-token ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
[MASK] 103); it holds single characters, their ``##`` continuations and a few whole words, so any text tokenizes.
"""

from __future__ import annotations

import string
from pathlib import Path

VOCAB_SIZE = 30522
SPECIAL = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
# The bundled clips' transcripts and the benchmark's manifest text, as whole words.
WORDS = "bin blue at f two now place white in j three please set with p soon clip number".split()
MINILM_SHAPES = {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536}


def wordpiece_vocab(size: int = VOCAB_SIZE) -> list[str]:
    """Tokens by id: specials at BERT's ids, ``[unusedN]`` fillers, characters, ``##`` pieces, words."""
    chars = string.ascii_lowercase + string.digits
    body = iter(dict.fromkeys([*chars, *string.punctuation, *("##" + c for c in chars), *WORDS]))
    vocab = []
    for i in range(size):
        filler = f"[unused{i}]"
        vocab.append(SPECIAL.get(i) or (filler if i < max(SPECIAL) else next(body, filler)))
    return vocab


def save_wordpiece_tokenizer(path: Path, size: int = VOCAB_SIZE):
    """A lower-casing BERT WordPiece tokenizer over :func:`wordpiece_vocab`, saved to ``path``; returned."""
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(wordpiece_vocab(size))}, do_lower_case=True)
    tok.save_pretrained(path)
    return tok


def save_minilm_shaped_bert(path: Path, seed: int = 0) -> str:
    """A BERT of all-MiniLM-L6-v2's shapes, random weights from ``seed``, with the generated tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=VOCAB_SIZE, **MINILM_SHAPES)).save_pretrained(path)
    save_wordpiece_tokenizer(path)
    return str(path)

"""Fixtures shared by the data tests: a real byte-level BPE tokenizer, trained here (no download)."""

from __future__ import annotations

import random

import pytest

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


def synthetic_documents(count: int, *, seed: int = 0, words: int = 120) -> list[str]:
    """``count`` documents of pseudo-English words (a fixed syllable lexicon), with punctuation, digits,
    newlines and a few non-ASCII characters, so a BPE learns realistic merges and byte fallbacks."""
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "je", "pa", "zu",
                 "tha", "ing", "er", "on", "st", "qu", "é", "ø", "ß"]
    lexicon = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    documents = []
    for _ in range(count):
        pieces = []
        for i in range(rng.randint(words // 2, words * 3 // 2)):
            word = rng.choice(lexicon)
            if rng.random() < 0.05:
                word = word.capitalize() + rng.choice([".", ",", "!", "?", ":"])
            elif rng.random() < 0.03:
                word = str(rng.randint(0, 99999))
            pieces.append(word)
            if rng.random() < 0.02:
                pieces.append("\n")
        documents.append(" ".join(pieces))
    return documents


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A byte-level BPE (16K vocabulary requested) trained on a few hundred synthetic documents, saved with
    ``save_pretrained`` as a transformers tokenizer directory: BOS ``<bos>``, EOS ``<eos>``, PAD ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=16384, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_documents(400, seed=1234), trainer)
    directory = tmp_path_factory.mktemp("bpe") / "bpe16k"
    bos, eos, pad = SPECIAL_TOKENS
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad).save_pretrained(directory)
    return directory

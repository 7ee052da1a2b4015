"""Training the corpus tokenizer with Hugging Face `tokenizers` and saving it for `AutoTokenizer`."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kubeforge.spec.data import PackingSpec, TokenizerSpec

EOS = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
UNK = "<|unk|>"
SPECIAL_TOKENS = [EOS, PAD, MASK, UNK]


def sample(total_characters: int, max_characters: int | None) -> Callable[[str], bool]:
    """Whether a document (by id) is in the texts to learn from: all when they hold at most
    `max_characters`, otherwise each with probability `max_characters / total`, decided by a hash of its
    id, so that the sample is the same on every run whatever the order of the documents."""
    if max_characters is None or total_characters <= max_characters:
        return lambda doc_id: True
    threshold = max_characters / total_characters * 2**64

    def keep(doc_id: str) -> bool:
        return int.from_bytes(hashlib.sha256(b"tokenizer\x00" + doc_id.encode()).digest()[:8], "big") < threshold

    return keep


def fit(
    item: dict[str, Any], parts: list[str], packing: PackingSpec, moved: dict[str, str], train_characters: int,
    spec: TokenizerSpec, out: str,
) -> dict[str, Any]:
    """Train the tokenizer on a sample of the training split, in a Ray worker, and save it to `out`."""
    from kubeforge.data.packing import training_texts

    texts = training_texts(parts, packing, moved, sample(train_characters, spec.max_training_characters))
    trained = train_tokenizer(texts, spec, Path(out))
    return {
        "vocab_size": len(trained), "trained_on_documents": len(texts),
        "trained_on_characters": sum(map(len, texts)), **special_token_ids(trained),
    }


def _unigram_corpus(texts: Sequence[str], min_frequency: int) -> Iterator[str]:
    """Texts with whitespace-separated words seen fewer than `min_frequency` times left out.

    The unigram trainer has no frequency cut-off of its own; dropping rare words before training
    gives `min_frequency` the same meaning as for BPE: rarer material contributes no pieces.
    """
    if min_frequency <= 1:
        yield from texts
        return
    counts = Counter(word for text in texts for word in text.split())
    for text in texts:
        yield " ".join(word for word in text.split() if counts[word] >= min_frequency)


def train_tokenizer(texts: Sequence[str], spec: TokenizerSpec, out_dir: Path) -> Any:
    """Train, save as a fast-tokenizer directory in `out_dir`, and return the `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kubeforge.formats.chat import CHAT_TEMPLATE

    if spec.type == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        bpe_trainer = trainers.BpeTrainer(
            vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=bpe_trainer, length=len(texts))
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        # Metaspace turns spaces into "▁"; every other character (tabs and newlines included) must be
        # in the alphabet or it would decode as <|unk|>.
        alphabet = sorted({c for text in texts for c in text if c != " "})
        unigram_trainer = trainers.UnigramTrainer(
            vocab_size=spec.vocab_size, special_tokens=SPECIAL_TOKENS, unk_token=UNK,
            initial_alphabet=alphabet, show_progress=False,
        )
        tokenizer.train_from_iterator(_unigram_corpus(texts, spec.min_frequency), trainer=unigram_trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, pad_token=PAD, mask_token=MASK, unk_token=UNK,
        # The chat format fine-tuning trains on: a pretrained model is then served for chat (vLLM refuses
        # chat requests to a model without a template) with the turns its fine-tuned versions will know.
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_id": int(tokenizer.convert_tokens_to_ids(EOS)),
        "eos_id": int(tokenizer.convert_tokens_to_ids(EOS)),
        "pad_id": int(tokenizer.convert_tokens_to_ids(PAD)),
        "mask_id": int(tokenizer.convert_tokens_to_ids(MASK)),
        "unk_id": int(tokenizer.convert_tokens_to_ids(UNK)),
    }

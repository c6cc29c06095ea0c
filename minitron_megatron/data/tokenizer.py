"""SentencePiece tokenizer with Megatron's tokenizer interface, and its trainer.

`GPTDataset` needs `vocab_size`, `eod` and `unique_identifiers` (part of its
index-cache key); `pad` is deliberately absent, so Megatron pads samples with
its own -1 id and masks them out of the loss.
"""

import hashlib
import io
import logging
import os
from typing import Dict, Iterable, List, Sequence

import sentencepiece

try:  # megatron-core >= 0.14 renamed the dataset tokenizer ABC
    from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer as _MegatronTokenizer
except ImportError:  # pragma: no cover - older megatron-core
    from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer as _MegatronTokenizer


TRAIN_THREADS = 2
"""Fixed, not os.cpu_count(): the model file records it, and the same corpus must give a
byte-identical tokenizer on every machine (runs compare tokenizer file digests)."""


class _DropLegacyWarning(logging.Filter):
    """Megatron warns on every construction that this ABC is 'legacy'; it is still the
    interface GPTDataset calls (0.16), so the warning is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "legacy tokenizer system" not in record.getMessage()


logging.getLogger(_MegatronTokenizer.__module__).addFilter(_DropLegacyWarning())


class SentencePieceTokenizer(_MegatronTokenizer):
    """A sentencepiece model; `eod` is its end-of-sentence id."""

    def __init__(self, model_path: str) -> None:
        with open(model_path, "rb") as handle:
            proto = handle.read()
        digest = hashlib.md5(proto, usedforsecurity=False).hexdigest()
        super().__init__(os.path.abspath(model_path), md5=digest)
        self.model_path = os.path.abspath(model_path)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        if self.processor.eos_id() < 0:
            raise ValueError(f"{model_path}: the sentencepiece model has no </s> piece to use as eod")
        self._vocab: Dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    @property
    def vocab(self) -> Dict[str, int]:
        if not self._vocab:
            self._vocab = {self.processor.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: piece for piece, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return self.processor.encode(text)

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Encode many texts in one (multi-threaded) sentencepiece call."""
        return self.processor.encode(list(texts))

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.processor.decode([int(i) for i in ids])

    @property
    def eod(self) -> int:
        return self.processor.eos_id()

    @property
    def eos(self) -> int:
        return self.processor.eos_id()

    @property
    def bos(self) -> int:
        return self.processor.bos_id()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> SentencePieceTokenizer:
    """Load a sentencepiece `.model` file as a Megatron tokenizer."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model {path!r} not found (a sentencepiece .model file)")
    return SentencePieceTokenizer(path)


def train_sentencepiece(lines: Iterable[str], vocab_size: int, output_path: str) -> None:
    """Train a BPE model suited to source code and write it to `output_path`.

    Identity normalisation and kept whitespace make decode(encode(text)) == text
    (indentation survives); byte fallback makes any text encodable. Ids: unk=0,
    bos=1, eos=2 (the eod), no pad.
    """
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=0,  # callers pass an already bounded, deterministic sample
        max_sentence_length=4096,
        num_threads=TRAIN_THREADS,
        minloglevel=2,
    )
    with open(output_path, "wb") as handle:
        handle.write(model.getvalue())


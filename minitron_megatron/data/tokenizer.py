"""SentencePiece and Hugging Face tokenizers with Megatron's tokenizer interface.

`GPTDataset` needs `vocab_size`, `eod` and `unique_identifiers` (part of its
index-cache key); `pad` is deliberately absent, so Megatron pads samples with
its own -1 id and masks them out of the loss.
"""

import hashlib
import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import sentencepiece

TRAIN_THREADS = 2
"""Fixed, not os.cpu_count(): the model file records it, and the same corpus must give a
byte-identical tokenizer on every machine (runs compare tokenizer file digests)."""


class _DatasetTokenizer:
    """What Megatron's `GPTDataset` reads of a tokenizer: `vocab_size`, `eod`, and
    `unique_identifiers` (json-dumped into the index-cache key).

    Why not Megatron's own base class: it moved (0.16's
    `datasets.megatron_tokenizer.MegatronLegacyTokenizer` is gone in 0.19, whose
    `tokenizers.MegatronTokenizerBase` takes a config dict and has no identifiers) and
    no dataset code checks the type. The identifiers are built exactly as 0.16's legacy
    base built them, so index caches keep their keys across versions.
    """

    def __init__(self, *tokenizer_paths: str, **tokenizer_options) -> None:
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = list(tokenizer_paths)
        for option, value in tokenizer_options.items():
            self.unique_identifiers[option] = str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)


class SentencePieceTokenizer(_DatasetTokenizer):
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


# ---- Hugging Face tokenizers ------------------------------------------------------------------

HF_BUNDLE_FORMAT = "minitron-hf-tokenizer/1"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "chat_template.jinja", "chat_template.json")
"""The text files of a HF tokenizer a bundle keeps (tokenizer.json is required)."""


def bundle_hf_tokenizer(hf_dir) -> str:
    """One JSON text holding a HF tokenizer's files verbatim.

    Why one file: a run dir's tokenizer is a single file that later stages copy (as
    `tokenizer.model`) and digest; tokenizer.json alone does not say which token is
    EOS/BOS (tokenizer_config.json does), so both must travel together.
    """
    hf_dir = Path(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{hf_dir}/tokenizer.json not found (a Hugging Face fast tokenizer is needed)")
    files = {name: (hf_dir / name).read_text(encoding="utf-8") for name in HF_TOKENIZER_FILES
             if (hf_dir / name).is_file()}
    return json.dumps({"format": HF_BUNDLE_FORMAT, "files": files})


def hf_tokenizer_files(path) -> Dict[str, str]:
    """{file name: text} of a bundle, or of a plain tokenizer.json and its sibling config files."""
    text = Path(path).read_text(encoding="utf-8")
    body = json.loads(text)
    if body.get("format") == HF_BUNDLE_FORMAT:
        return dict(body["files"])
    files = {"tokenizer.json": text}
    for name in HF_TOKENIZER_FILES[1:]:
        sibling = Path(path).parent / name
        if sibling.is_file():
            files[name] = sibling.read_text(encoding="utf-8")
    return files


def write_hf_tokenizer(path, out_dir) -> List[str]:
    """Write a bundle's (or plain tokenizer.json's) files into `out_dir`, byte for byte."""
    written = []
    for name, text in hf_tokenizer_files(path).items():
        (Path(out_dir) / name).write_text(text, encoding="utf-8")
        written.append(name)
    return written


def _token_text(token: Union[None, str, dict]) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    return token.get("content") if isinstance(token, dict) else token


class HFTokenizer(_DatasetTokenizer):
    """A Hugging Face fast tokenizer, with Megatron-LM's HuggingFaceTokenizer semantics:
    `tokenize` applies the tokenizer's post-processor (so Llama 3 documents start with
    <|begin_of_text|>), `eod` is the EOS token, `vocab_size` counts added tokens."""

    def __init__(self, path: str) -> None:
        import tokenizers

        files = hf_tokenizer_files(path)
        digest = hashlib.md5(Path(path).read_bytes(), usedforsecurity=False).hexdigest()
        super().__init__(os.path.abspath(path), md5=digest)
        self.path = os.path.abspath(path)
        self.tokenizer = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
        config = json.loads(files.get("tokenizer_config.json", "{}"))
        special = json.loads(files.get("special_tokens_map.json", "{}"))
        self.eos_token = _token_text(config.get("eos_token") or special.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token") or special.get("bos_token"))
        if self.eos_token is None or self.tokenizer.token_to_id(self.eos_token) is None:
            raise ValueError(f"{path}: the tokenizer names no EOS token in its vocabulary "
                             f"(eos_token={self.eos_token!r}); Megatron needs it as the EOD")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def vocab(self) -> Dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: piece for piece, i in self.vocab.items()}

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def detokenize(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eod(self) -> int:
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> Optional[int]:
        return None if self.bos_token is None else self.tokenizer.token_to_id(self.bos_token)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _is_json(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(1) == b"{"


def load_tokenizer(path: str):
    """Load a tokenizer file as a Megatron tokenizer: a sentencepiece `.model`, a HF
    `tokenizer.json` (with its sibling tokenizer_config.json) or a run dir's HF bundle."""
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model {path!r} not found (a sentencepiece .model file, a Hugging Face "
                                "tokenizer.json or a run directory's tokenizer)")
    # Sniffed, not by extension: a run dir keeps any tokenizer under the name tokenizer.model.
    return HFTokenizer(path) if _is_json(path) else SentencePieceTokenizer(path)


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


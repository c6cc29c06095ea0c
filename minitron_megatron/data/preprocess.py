"""Tokenize text files into a Megatron indexed dataset (`PREFIX.bin` + `PREFIX.idx`).

    python -m minitron_megatron.data.preprocess --input docs.jsonl [more.txt ...] \\
        [--json-key text] --tokenizer-model tok.model --output-prefix /data/docs_text_document

Documents:
  * `.jsonl` / `.json` files: one JSON object per line, the document is its
    `--json-key` string (as Megatron-LM's tools/preprocess_data.py reads them).
  * any other file (e.g. `.txt`): documents are separated by one or more blank
    lines; each block is kept verbatim (its lines joined with newlines). Put one
    document per file with no blank lines inside if you need whole files.
Blank documents are skipped; every document gets the tokenizer's EOD appended.
The files are written under temporary names and renamed into place, and the
last line printed is a JSON summary: {"documents": N, "tokens": M, "prefix": ...}.
"""

import argparse
import itertools
import json
import os
import sys
import time
from typing import Iterator, List, Optional, Sequence

from minitron_megatron.data.indexed import write_indexed_dataset
from minitron_megatron.data.tokenizer import load_tokenizer

ENCODE_BATCH = 256
JSON_SUFFIXES = (".jsonl", ".json")


def _jsonl_documents(path: str, json_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
            text = record.get(json_key) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_number}: no string field {json_key!r} (see --json-key)")
            yield text


def _text_blocks(path: str) -> Iterator[str]:
    block: List[str] = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def iter_documents(paths: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Non-blank documents of every input file, in order."""
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path}: file not found")
        reader = _jsonl_documents(path, json_key) if path.endswith(JSON_SUFFIXES) else _text_blocks(path)
        yield from (text for text in reader if text.strip())


def _encoded(texts: Iterator[str], tokenizer) -> Iterator[List[int]]:
    while True:
        batch = list(itertools.islice(texts, ENCODE_BATCH))
        if not batch:
            return
        yield from tokenizer.tokenize_batch(batch)


def preprocess(inputs: Sequence[str], tokenizer_model: str, output_prefix: str,
               json_key: str = "text") -> dict:
    """Tokenize `inputs` into `output_prefix.{bin,idx}`; return the summary dict."""
    started = time.time()
    if not os.path.isfile(tokenizer_model):
        raise ValueError(f"--tokenizer-model {tokenizer_model}: file not found")
    tokenizer = load_tokenizer(tokenizer_model)
    texts = iter_documents(inputs, json_key)
    first = next(texts, None)
    if first is None:
        raise ValueError(f"--input {' '.join(inputs)}: no documents found (all files empty or blank)")
    documents = _encoded(itertools.chain([first], texts), tokenizer)
    stats = write_indexed_dataset(documents, tokenizer.eod, tokenizer.vocab_size, output_prefix)
    return {
        "documents": stats.documents,
        "tokens": stats.tokens,
        "prefix": os.path.abspath(output_prefix),
        "vocab_size": tokenizer.vocab_size,
        "seconds": round(time.time() - started, 2),
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m minitron_megatron.data.preprocess",
        description="Tokenize .jsonl/.txt files into a Megatron indexed dataset (.bin/.idx).",
    )
    parser.add_argument("--input", nargs="+", required=True,
                        help=".jsonl (one JSON object per line) or text files (blank-line-separated documents)")
    parser.add_argument("--json-key", default="text", help="field holding the document in .jsonl inputs")
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point; exits non-zero with one message on bad input."""
    args = _parser().parse_args(argv)
    try:
        summary = preprocess(args.input, args.tokenizer_model, args.output_prefix, args.json_key)
    except (ValueError, FileNotFoundError, UnicodeDecodeError) as error:
        sys.exit(f"error: {error}")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

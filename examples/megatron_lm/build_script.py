"""Write `pretrain_gpt_distill.py`: Megatron-LM's pretrain_gpt.py with its __main__ block
replaced by the drop-in snippet of docs/distill.md for its tag, taken verbatim from the doc.

    python build_script.py MEGATRON_LM_DIR/pretrain_gpt.py docs/distill.md OUT.py [--tag TAG]

The snippet is read from the doc (not kept in a copy here), so what runs is what users read.
The doc has one snippet per Megatron-LM tag (pretrain_gpt.py's __main__ block differs between
them), each under a `###` heading naming the tag; TAG defaults to the `TAG` file that distill.sh
writes beside the archived pretrain_gpt.py.
"""

import argparse
import re
from pathlib import Path

SECTION = "## Drop-in for Megatron-LM recipes"
MAIN = 'if __name__ == "__main__":'


def doc_snippet(doc: str, tag: str) -> str:
    """The first ```python block under the `###` heading that names `tag` in the drop-in section."""
    section = re.split(r"^## ", doc.split(SECTION, 1)[1], flags=re.M)[0]
    # Sub-sections: each `### ...` heading with the text up to the next one.
    headed = re.findall(r"^### ([^\n]*)\n(.*?)(?=^### |\Z)", section, flags=re.M | re.S)
    bodies = [body for heading, body in headed if f"`{tag}`" in heading]
    if len(bodies) != 1:
        raise ValueError(f"{len(bodies)} `###` headings naming `{tag}` under {SECTION!r}; need exactly one")
    match = re.search(r"```python\n(.*?)```", bodies[0], flags=re.S)
    if match is None:
        raise ValueError(f"no ```python block under the {tag} heading of {SECTION!r}")
    return match.group(1)


def distill_script(pretrain_gpt: str, snippet: str) -> str:
    """pretrain_gpt.py up to its __main__ block, then the snippet (which brings its own)."""
    head, sep, _ = pretrain_gpt.rpartition(MAIN)
    if not sep:
        raise ValueError(f"pretrain_gpt.py has no {MAIN!r} block")
    return head + snippet


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pretrain_gpt")
    parser.add_argument("doc")
    parser.add_argument("out")
    parser.add_argument("--tag", help="Megatron-LM tag (default: the TAG file beside pretrain_gpt.py)")
    args = parser.parse_args(argv)
    tag = args.tag or (Path(args.pretrain_gpt).parent / "TAG").read_text().strip()
    snippet = doc_snippet(Path(args.doc).read_text(), tag)
    Path(args.out).write_text(distill_script(Path(args.pretrain_gpt).read_text(), snippet))


if __name__ == "__main__":
    main()

"""Write `pretrain_gpt_distill.py`: Megatron-LM's pretrain_gpt.py with its __main__ block
replaced by the drop-in snippet of docs/distill.md, taken verbatim from the doc.

    python build_script.py MEGATRON_LM_DIR/pretrain_gpt.py docs/distill.md OUT.py

The snippet is read from the doc (not kept in a copy here), so what runs is what users read.
"""

import re
import sys
from pathlib import Path

SECTION = "## Drop-in for Megatron-LM recipes"
MAIN = 'if __name__ == "__main__":'


def doc_snippet(doc: str) -> str:
    """The first ```python block under the drop-in section of docs/distill.md."""
    section = doc.split(SECTION, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    if match is None:
        raise ValueError(f"no ```python block under {SECTION!r}")
    return match.group(1)


def distill_script(pretrain_gpt: str, snippet: str) -> str:
    """pretrain_gpt.py up to its __main__ block, then the snippet (which brings its own)."""
    head, sep, _ = pretrain_gpt.rpartition(MAIN)
    if not sep:
        raise ValueError(f"pretrain_gpt.py has no {MAIN!r} block")
    return head + snippet


def main(pretrain_gpt: str, doc: str, out: str) -> None:
    Path(out).write_text(distill_script(Path(pretrain_gpt).read_text(), doc_snippet(Path(doc).read_text())))


if __name__ == "__main__":
    main(*sys.argv[1:])

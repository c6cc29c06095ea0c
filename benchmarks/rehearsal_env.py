"""The GPU machine's Python, rebuilt on this one for benchmarks/gpu_check.sh --rehearse.

    DONOR_PYTHON benchmarks/rehearsal_env.py DEST

DONOR_PYTHON is any Python 3.12 environment that holds the GPU machine's packages (CI's
.venv-py3.12, which holds more: megatron-core, Hydra, gguf, ...). DEST becomes a fresh venv
(with pip, as the machine has) that sees only the distributions benchmarks/gpu_machine.txt
lists and the ones they require (markers evaluated, no extras), linked from the donor's
site-packages: an import of anything else fails here as it fails there. A listed package whose
donor version differs from the list is installed at the listed version into DEST from the
package index (with what that version requires and DEST lacks), except torch and Triton, which go together: those are the
donor's, and every version that still differs is printed (this machine's index has no torch
2.11). The last line of stdout is DEST's python.
"""

import argparse
import importlib.metadata as md
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from packaging.requirements import Requirement

LIST = Path(__file__).with_name("gpu_machine.txt")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wanted() -> dict:
    """{normalised name: version prefix or None} from gpu_machine.txt."""
    out = {}
    for line in LIST.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[_name(name)] = version or None
    return out


def closure(names) -> dict:
    """{normalised name: Distribution} of `names` and everything they require, in the donor."""
    installed = {_name(d.metadata["Name"]): d for d in md.distributions()}
    missing = [n for n in names if n not in installed]
    if missing:
        sys.exit(f"error: the donor Python ({sys.executable}) lacks {missing}: it must hold the GPU machine's packages")
    found, todo = {}, list(names)
    while todo:
        name = todo.pop()
        if name in found or name not in installed:
            continue  # a requirement the donor lacks is one the machine's packages run without
        found[name] = dist = installed[name]
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_name(req.name))
    return found


PAIRED = ("torch", "triton")
"""Compiled against each other: never mixed across releases here."""


def _matches(version: str, prefix: str) -> bool:
    return version == prefix or version.startswith((prefix + ".", prefix + "+"))


def _pin_listed_versions(python: Path, listed: dict, dists: dict) -> None:
    """Install into DEST the listed version of each package the donor has at another (pip sees the
    linked packages as installed, so it adds only what that version needs beyond them)."""
    for name, prefix in listed.items():
        version = dists[name].version
        if not prefix or _matches(version, prefix):
            continue
        if name not in PAIRED and subprocess.run(
                [str(python), "-m", "pip", "install", "-q", f"{name}=={prefix}.*"],
                capture_output=True).returncode == 0:
            print(f"{name} {prefix} installed (the donor has {version})")
        else:
            print(f"note: the GPU machine has {name} {prefix}, this rehearsal {version} (the donor's)")


def build(dest: Path, pip: bool = True, pin: bool = True) -> Path:
    """DEST's python; `pip=False` makes the venv without pip, `pin=False` keeps every donor
    version (tests/test_gpu_check.py: what the environment can import, in seconds)."""
    listed = wanted()
    dists = closure(listed)
    subprocess.run([sys.executable, "-m", "venv", "--clear", *([] if pip else ["--without-pip"]), str(dest)],
                   check=True)
    site = dest / "gpu_site"
    site.mkdir()
    donor_site = Path(sysconfig.get_paths()["purelib"])
    for dist in dists.values():
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and source.parent == donor_site:
                (site / top).symlink_to(source)
    python = dest / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    (Path(target) / "gpu_machine.pth").write_text(f"{site}\n")
    if pin:
        _pin_listed_versions(python, listed, dists)
    print(f"{len(dists)} distributions ({len(listed)} listed, the rest required by them) linked into {site}")
    return python


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path)
    parser.add_argument("--without-pip", action="store_true", help="a venv without pip (and no version pins)")
    parser.add_argument("--no-pin", action="store_true", help="keep the donor's version of every package")
    args = parser.parse_args(argv)
    print(build(args.dest.resolve(), pip=not args.without_pip, pin=not (args.no_pin or args.without_pip)))


if __name__ == "__main__":
    main()

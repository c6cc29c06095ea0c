"""The GPU check's wheels: benchmarks/gpu_wheels.txt with its versions resolved, and a
wheel folder checked against it (names, versions, one wheel each, installable on the GPU
machine's CPython 3.12 x86-64).

    python3 benchmarks/gpu_wheels.py --list            # NAME==VERSION a line (wheelhouse.sh fetches these)
    python3 benchmarks/gpu_wheels.py --check DIR       # DIR's wheel of each, a line each; problems: exit 2
    python3 benchmarks/gpu_wheels.py --python-version  # the GPU machine's Python

Standard library and `packaging` (pip's copy where it is not installed) only: the GPU
machine runs it before anything is installed.
"""

import argparse
import re
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare interpreter: pip's vendored copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
LIST = ROOT / "benchmarks" / "gpu_wheels.txt"
PINS = ROOT / "requirements" / "cpu.txt"
PYTHON = "3.12"
"""The GPU machine's Python (shared/ENVIRONMENT.md: CPython 3.12.3 on x86-64 Linux)."""
TARGET = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix"}
"""The environment markers of requirements/cpu.txt are evaluated for that machine, not this one."""
PLATFORM = re.compile(r"any|linux_x86_64|manylinux(1|2010|2014|_\d+_\d+)_x86_64")


def canonical(name: str) -> str:
    """PEP 503 name: `megatron_core` and `Megatron-Core` are `megatron-core`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(path: Path):
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            yield Requirement(line)


def _exact(req) -> list:
    return [s.version for s in req.specifier if s.operator == "=="]


def pinned(name: str) -> str:
    """The version requirements/cpu.txt pins for `name` on the GPU machine's Python."""
    found = [v for req in _requirements(PINS) if canonical(req.name) == canonical(name)
             and (req.marker is None or req.marker.evaluate(TARGET)) for v in _exact(req)]
    if len(found) != 1:
        raise ValueError(f"requirements/cpu.txt has {len(found)} '==' pins of {name} for Python {PYTHON}; "
                         "benchmarks/gpu_wheels.txt needs exactly one")
    return found[0]


def required() -> dict:
    """{name: (version, where the version comes from)} for every line of gpu_wheels.txt."""
    out = {}
    for req in _requirements(LIST):
        name, pins = canonical(req.name), _exact(req)
        if name in out or len(req.specifier) != len(pins) or len(pins) > 1:
            raise ValueError(f"benchmarks/gpu_wheels.txt: {req}: name each package once, as NAME==VERSION or NAME")
        out[name] = (pins[0], "benchmarks/gpu_wheels.txt") if pins else (pinned(name), "requirements/cpu.txt")
    return out


def parse_wheel(filename: str):
    """(name, version, (python tags, abi tags, platform tags)) of a wheel file name, or None."""
    parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
    if len(parts) not in (5, 6):
        return None
    return canonical(parts[0]), parts[1], tuple(tag.split(".") for tag in parts[-3:])


def installable(tags) -> bool:
    """Whether pip installs a wheel of these tags on CPython 3.12, x86-64 Linux."""
    pys, abis, platforms = tags
    cp = f"cp{PYTHON.replace('.', '')}"
    stable = [int(p[3:]) for p in pys if re.fullmatch(r"cp3\d+", p)]  # cp3X-abi3 runs on 3.X and later
    python_ok = bool({cp, "py3", f"py{cp[2:]}"} & set(pys) and {cp, "none"} & set(abis)) or (
        "abi3" in abis and any(minor <= int(cp[3:]) for minor in stable))
    return python_ok and any(PLATFORM.fullmatch(p) for p in platforms)


def check(folder: Path):
    """(the wheel file of each required package, problems); the files only when there are none."""
    need = required()
    if not folder.is_dir():
        return [], [f"--wheels {folder}: no such directory (make it with benchmarks/wheelhouse.sh {folder})"]
    found = {}
    for path in sorted(folder.glob("*.whl")):
        parsed = parse_wheel(path.name)
        if parsed and parsed[0] in need:
            found.setdefault(parsed[0], []).append((path, *parsed[1:]))
    files, problems = [], []
    for name, (version, source) in need.items():
        wheels = found.get(name, [])
        if not wheels:
            problems.append(f"--wheels {folder}: no {name} wheel (need {name}=={version}, from {source})")
        elif len(wheels) > 1:
            problems.append(f"--wheels {folder}: {len(wheels)} wheels of {name} "
                            f"({', '.join(p.name for p, *_ in wheels)}): keep only {name}=={version}")
        else:
            path, have, tags = wheels[0]
            if not _same_version(have, version):
                problems.append(f"--wheels {folder}: {path.name} is {name} {have}, need {version} (from {source})")
            elif not installable(tags):
                problems.append(f"--wheels {folder}: {path.name} does not install on CPython {PYTHON} x86-64 Linux")
            else:
                files.append(path)
    return (files if not problems else []), problems


def _same_version(a: str, b: str) -> bool:
    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="print NAME==VERSION a line")
    what.add_argument("--check", metavar="DIR", type=Path, help="print DIR's wheel of each; exit 2 on a problem")
    what.add_argument("--python-version", action="store_true", help="print the GPU machine's Python version")
    args = p.parse_args(argv)
    try:
        if args.python_version:
            print(PYTHON)
        elif args.list:
            print("\n".join(f"{name}=={version}" for name, (version, _) in required().items()))
        else:
            files, problems = check(args.check)
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            for path in files:
                print(path)
            return 2 if problems else 0
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

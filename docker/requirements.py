"""Requirement lists for docker/Dockerfile, which must keep the NGC container's torch.

    python docker/requirements.py --container-pins
        `name==version` for the container's CUDA builds (torch, Triton, Transformer
        Engine): a pip constraints file, so no later install can replace them.
    python docker/requirements.py megatron-core "minitron-megatron[slurm]"
        the requirements of these installed distributions (and extras), minus the
        container-owned ones: what `pip install --no-deps` skipped.
"""

import sys
from importlib.metadata import distributions, requires

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONTAINER_OWNED = {
    "torch",
    "triton",
    "pytorch-triton",
    "transformer-engine",
    "transformer-engine-torch",
    "transformer-engine-cu12",
    "transformer-engine-cu13",
    "apex",
}


def container_pins() -> list[str]:
    pins = set()
    for dist in distributions():
        name = dist.metadata["Name"] or ""
        if canonicalize_name(name) in CONTAINER_OWNED:
            pins.add(f"{name}=={dist.version}")
    return sorted(pins)


def requirements(spec: str) -> list[str]:
    """`name[extra,...]` -> its unconditional requirements plus those of the extras."""
    wanted = Requirement(spec)
    extras = [""] + sorted(wanted.extras)
    lines = []
    for line in requires(wanted.name) or []:
        req = Requirement(line)
        if canonicalize_name(req.name) in CONTAINER_OWNED:
            continue
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in extras):
            continue
        req.marker = None
        lines.append(str(req))
    return lines


if __name__ == "__main__":
    if sys.argv[1:] == ["--container-pins"]:
        out = container_pins()
    else:
        out = []
        for spec in sys.argv[1:]:
            out += [r for r in requirements(spec) if r not in out]
    print("\n".join(out))

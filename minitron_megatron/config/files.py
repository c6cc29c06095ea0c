"""Where the YAMLs are: the checkout's top-level `conf/`, or the wheel's package data.

The repository keeps them in `conf/` at its root (the project's layout); setup.py
ships that folder inside the package as `minitron_megatron/conf/`, so an
installed wheel finds them with no checkout around.
"""

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def conf_dir() -> Path:
    """The directory holding train.yaml, model/, data/, ... for this installation."""
    packaged = _PACKAGE / "conf"  # an installed wheel
    if packaged.is_dir():
        return packaged
    return _PACKAGE.parent / "conf"  # a checkout (plain or editable install)

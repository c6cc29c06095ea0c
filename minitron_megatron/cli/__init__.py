"""Command-line entry points (the only package that imports Hydra).

`main(name)` runs one command of `registry.COMMANDS`; the zero-argument functions
below are the console scripts (`minitron-train`, ...), and the modules
`minitron_megatron/<name>.py` make `python -m minitron_megatron.<name>` call the same.
"""

from minitron_megatron.cli.app import main


def train() -> None:
    main("train")


def evaluate() -> None:
    main("evaluate")


def prune() -> None:
    main("prune")


def distill() -> None:
    main("distill")


def run() -> None:
    main("run")


def convert() -> None:
    main("convert")


def search() -> None:
    main("search")


def plan() -> None:
    main("plan")

"""The commands: name -> (YAML in conf/, typed schema, stage function).

Stage functions are imported only when their command runs, after the runtime has
chosen the device: on CPU, Megatron-core must be imported the way
`runtime/cpu_support.py` does it.
"""

from dataclasses import dataclass
from typing import Callable, Dict

from minitron_megatron.config import commands as C


def _train():
    from minitron_megatron.train.loop import pretrain

    return pretrain


def _evaluate():
    from minitron_megatron.recipes.evaluate import evaluate_run

    return evaluate_run


def _prune():
    from minitron_megatron.recipes.prune import prune

    return prune


def _distill():
    from minitron_megatron.distill.loop import distill

    return distill


def _convert():
    from minitron_megatron.convert.stage import convert

    return convert


def _run():
    from minitron_megatron.recipes.run import run_recipe

    return run_recipe


def _search():
    from minitron_megatron.search.command import search

    return search


def _plan():
    from minitron_megatron.plan.command import plan

    return plan


@dataclass(frozen=True)
class Command:
    name: str
    """`python -m minitron_megatron.<name>`, console script `minitron-<name>`, conf/<name>.yaml."""
    schema: type
    stage: Callable[[], Callable]
    """Returns the stage function `(cfg, ctx) -> summary dict`."""
    builds_from_model: bool = False
    """Builds `model=` when no `load=` is given: its parallel sizes are checked before start-up."""
    starts_runtime: bool = True
    """False: the stage gets no runtime (ctx None) and runs in this one process (plan simulates ranks)."""


COMMANDS: Dict[str, Command] = {
    "train": Command("train", C.TrainCommand, _train, builds_from_model=True),
    "evaluate": Command("evaluate", C.EvaluateCommand, _evaluate),
    "prune": Command("prune", C.PruneCommand, _prune),
    "distill": Command("distill", C.DistillCommand, _distill),
    "run": Command("run", C.RunCommand, _run, builds_from_model=True),
    "convert": Command("convert", C.ConvertCommand, _convert),
    "search": Command("search", C.SearchCommand, _search),
    "plan": Command("plan", C.PlanCommand, _plan, starts_runtime=False),
}

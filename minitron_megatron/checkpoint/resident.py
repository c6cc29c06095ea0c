"""Loaded models kept across the in-process stages of one command (the search's teacher).

A search runs, in one process, importance once per round and then every candidate's trim and
distillation. Each stage used to read its model from the checkpoint itself: the teacher was
read twice per candidate (the trim's source, the distillation's teacher), minutes per read at
70B. With a `ResidentModels` the first stage that needs a model loads it and the later ones
borrow it. A borrower must leave the model as it found it: no parameter released, replaced or
trained (the trim copies what it keeps, `release_source=False`; the teacher is frozen).
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Tuple


def resident_key(path, model_cfg, parallel, precision: Optional[str] = None) -> Tuple[str, str]:
    """What makes two loads the same model: the run dir, the architecture and dtype it is built
    with (resolved), its TP/PP layout and the teacher precision applied after loading."""
    return str(Path(path).resolve()), repr((asdict(model_cfg.resolved()), asdict(parallel), precision))


class ResidentModels:
    """Models by `resident_key`: `get(key, load)` calls `load()` the first time only."""

    def __init__(self):
        self._models: Dict[Tuple[str, str], Any] = {}
        self.loads = 0
        """How many models were loaded (a test's spy on the number of checkpoint reads)."""

    def get(self, key: Tuple[str, str], load: Callable[[], Any]) -> Any:
        if key not in self._models:
            self._models[key] = load()
            self.loads += 1
        return self._models[key]

    def keep_only(self, paths: Iterable[str]) -> None:
        """Drop every model not loaded from one of `paths` (a new round starts elsewhere)."""
        keep = {str(Path(p).resolve()) for p in paths}
        for key in [k for k in self._models if k[0] not in keep]:
            del self._models[key]

    def clear(self) -> None:
        self._models.clear()

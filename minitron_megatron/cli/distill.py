"""python -m minitron_megatron.distill teacher.load=DIR student.load=DIR data=stdlib save=DIR"""

import json
import sys

from minitron_megatron.cli.app import hydra_entry


def run_distill(cfg, ctx) -> dict:
    """The distill stage, with a diverged run turned into exit status 3.

    The summary line says which loss component diverged and which checkpoint is
    the last good one; `run_stage` still tears the runtime down on the way out.
    """
    from minitron_megatron.distill.loop import TrainingDiverged, distill

    try:
        return distill(cfg, ctx)
    except TrainingDiverged as err:
        if ctx.is_main:
            print(json.dumps({"diverged": err.component, "step": err.step,
                              "last_checkpoint": err.last_checkpoint}), flush=True)
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(3) from err


def main() -> None:
    hydra_entry("distill", "minitron_megatron.cli.distill:run_distill")()


if __name__ == "__main__":
    main()

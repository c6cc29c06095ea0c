"""python -m minitron_megatron.evaluate load=runs/teacher data=stdlib"""

from minitron_megatron.cli.app import hydra_entry


def main() -> None:
    hydra_entry("evaluate", "minitron_megatron.train.evaluate:evaluate_run")()


if __name__ == "__main__":
    main()

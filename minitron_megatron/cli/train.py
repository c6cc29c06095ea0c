"""python -m minitron_megatron.train model=tiny data=stdlib save=runs/teacher"""

from minitron_megatron.cli.app import hydra_entry


def main() -> None:
    hydra_entry("train", "minitron_megatron.train.loop:pretrain")()


if __name__ == "__main__":
    main()

"""python -m minitron_megatron.train model=tiny data=stdlib save=runs/teacher"""

from minitron_megatron.cli.app import hydra_entry


def main() -> None:
    from minitron_megatron.train.loop import pretrain

    hydra_entry("train", pretrain)()


if __name__ == "__main__":
    main()

"""`python -m minitron_megatron.train`: see minitron_megatron.cli (registry.COMMANDS["train"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("train")

"""`python -m minitron_megatron.run`: see minitron_megatron.cli (registry.COMMANDS["run"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("run")

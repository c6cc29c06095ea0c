"""`python -m minitron_megatron.evaluate`: see minitron_megatron.cli (registry.COMMANDS["evaluate"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("evaluate")

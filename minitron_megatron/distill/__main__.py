"""`python -m minitron_megatron.distill`: see minitron_megatron.cli (registry.COMMANDS["distill"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("distill")

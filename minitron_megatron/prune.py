"""`python -m minitron_megatron.prune`: see minitron_megatron.cli (registry.COMMANDS["prune"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("prune")

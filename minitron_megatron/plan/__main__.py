"""`python -m minitron_megatron.plan`: see minitron_megatron.cli (registry.COMMANDS["plan"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("plan")

"""`python -m minitron_megatron.convert`: see minitron_megatron.cli (registry.COMMANDS["convert"])."""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("convert")

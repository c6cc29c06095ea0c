"""`python -m minitron_megatron.evaluate`: see minitron_megatron.cli.evaluate."""

from minitron_megatron.cli.evaluate import main

if __name__ == "__main__":
    main()

"""`python -m minitron_megatron.prune`: see minitron_megatron.cli.prune."""

from minitron_megatron.cli.prune import main

if __name__ == "__main__":
    main()

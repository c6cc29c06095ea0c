"""`python -m minitron_megatron.run`: see minitron_megatron.cli.run."""

from minitron_megatron.cli.run import main

if __name__ == "__main__":
    main()

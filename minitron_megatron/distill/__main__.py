from minitron_megatron.cli.distill import main

if __name__ == "__main__":
    main()

"""`python -m minitron_megatron.search`: see minitron_megatron.cli (registry.COMMANDS["search"]).

`search` is a package (the library of the search), so its `python -m` entry is this file
rather than a `minitron_megatron/search.py` shim, which the package would shadow.
"""

if __name__ == "__main__":
    from minitron_megatron.cli import main

    main("search")

"""`python -m ism_ext <command>`: see `ism_ext.cli`."""

from .cli import main

if __name__ == "__main__":
    main()

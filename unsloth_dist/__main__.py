"""`python -m unsloth_dist` = the `unsloth-dist` command."""
from .cli import main

if __name__ == "__main__":
    main()

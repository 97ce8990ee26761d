"""`python -m convtrain` is the `convtrain` command."""

from convtrain.cli import main

if __name__ == "__main__":
    main()

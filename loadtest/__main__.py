"""`python -m loadtest ...` is the `adapterserve-loadtest` console script."""

from loadtest.cli import main

if __name__ == "__main__":
    main()

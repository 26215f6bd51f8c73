"""`python -m adapterserve.loadtest ...` is the `adapterserve-loadtest` console script."""

from adapterserve.loadtest.cli import main

if __name__ == "__main__":
    main()

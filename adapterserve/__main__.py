"""`python -m adapterserve ...` is the `adapterserve` console script."""

from adapterserve.server.cli import main

if __name__ == "__main__":
    main()

"""Generates benchmark volumes: see volcopy.bench.workloads."""

from volcopy.bench.workloads import main

if __name__ == "__main__":
    main()

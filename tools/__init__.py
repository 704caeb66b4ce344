"""Applications built on the packages (checks, benchmarks); run from the repository root as ``python -m tools.X``."""

# A package, so that its conftest is `slurm.conftest` and never shadows the `conftest` module that
# tests/e2e imports by name when both directories run in one pytest session.

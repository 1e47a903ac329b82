"""The miniature world: a procedural text-to-image world small enough to run every DDE method on a CPU.

See docs/miniature.md; the one command is ``bash experiments/miniature/run.sh [--smoke]``.
"""

"""`python -m runner …` is the `infra` command (useful where the console script is not on PATH, e.g. over SSH)."""

from runner.cli import main

main()

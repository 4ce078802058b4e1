"""`infra-wkdir --get | --set PATH | --clear`: the seed's entry point, on the same store as `infra workdir`."""

from __future__ import annotations

import argparse
import sys

from runner.errors import InfraError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infra-wkdir",
        description="Get, set or clear the node's workdir (same setting as 'infra workdir').",
        epilog="Example: infra-wkdir --set ~/protein-work",
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--get", action="store_true", help="print the effective workdir")
    group.add_argument("--set", metavar="PATH", help="store PATH (an existing directory) as the workdir")
    group.add_argument("--clear", action="store_true", help="forget the stored workdir")
    args = parser.parse_args(argv)

    from runner.cli.output import echo, say
    from runner.workdir.store import clear_workdir, get_workdir, set_workdir

    try:
        if args.get:
            echo(str(get_workdir(required=True)))
        elif args.set is not None:
            say(f"workdir set to {set_workdir(args.set)}")
        else:
            say("workdir cleared" if clear_workdir() else "no workdir was stored")
    except InfraError as exc:
        say(f"infra-wkdir: error: {exc.message}")
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

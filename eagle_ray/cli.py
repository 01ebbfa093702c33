"""The `eagle-ray` command: `eagle-ray COMMAND [ARGS...]` runs that job's own `main` with ARGS.

Each job keeps its own argument parser (`eagle-ray train --help` is the train job's help); this only picks the job
and names it in usage lines. The `jobs/*.py` scripts, the `ray job submit` entrypoints, call the same mains.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

PROG = "eagle-ray"

# name -> ("module:function", one line of help); a module is imported only when its command runs (train pulls in
# Ray, bench the whole suite). A new command is one more entry here.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("eagle_ray.job.run:main", "train an EAGLE-3 draft against a pool of target replicas (Ray Train)"),
    "dump": ("eagle_ray.job.dump:main", "the train job with offline.mode=dump: write its supervision to disk"),
    "regenerate": ("eagle_ray.job.regenerate:main", "rewrite chat data with the target's own answers, on a pool"),
    "evaluate": ("eagle_ray.job.evaluate:main", "measure a draft export's acceptance on a target (no Ray)"),
    "chaos": ("eagle_ray.job.chaos:main", "train while replicas and a worker are killed; audit every sample"),
    "bench": ("eagle_ray.job.bench:main", "the benchmark suite, benchmarks/suite.py of this checkout"),
}


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} COMMAND [ARGS...]",
        description=__doc__.split("\n\n")[0],
        epilog="commands:\n" + "\n".join(lines) + f"\n\n`{PROG} COMMAND --help` lists that command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _load(name: str) -> Callable[[list[str]], int | None]:
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser()
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of the commands below")
    # only the first word is ours: everything after it, --help included, is the job's
    name = parser.parse_args(argv[:1]).command
    job = _load(name)
    saved = sys.argv[0]
    sys.argv[0] = f"{PROG} {name}"  # the jobs' parsers take their prog (usage line) from argv[0]
    try:
        return job(argv[1:]) or 0
    finally:
        sys.argv[0] = saved


if __name__ == "__main__":
    sys.exit(main())

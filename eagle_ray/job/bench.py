"""`eagle-ray bench`: the checkout's benchmark suite, `benchmarks/suite.py`.

benchmarks/ is not an installed package (it measures the checkout it sits in, and writes its results there), so
this finds it beside the `eagle_ray` package of an editable install and runs it as a script would be run.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"


def main(argv: list[str] | None = None) -> int:
    if not SUITE.is_file():
        print(
            f"eagle-ray bench: no benchmark suite at {SUITE}: it runs from a source checkout "
            "(git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    suite = runpy.run_path(str(SUITE), run_name="eagle_ray_bench_suite")  # not __main__: we call main ourselves
    suite["main"](sys.argv[1:] if argv is None else argv)
    return 0

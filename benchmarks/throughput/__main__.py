"""``python -m benchmarks.throughput``: the engine parts of ``python -m benchmarks.run`` (the
steered engine's scenarios and stock vLLM); every flag of ``benchmarks.run`` works here. A
module of its own, so that benchmarks.run imports the measurement (``benchmarks.throughput``)
and not the other way round."""

from __future__ import annotations

import sys

from benchmarks import run


def main(argv: list[str] | None = None) -> None:
    run.main(["--parts", "engine,stock", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()

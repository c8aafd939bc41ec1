"""Benchmarks: `make bench` (or `python -m tests.bench [name ...]`). Never part of `make test`.

Each benchmark times our code and a reference in the same run and prints both and their ratio;
results also go to .local/bench/<name>.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from pathlib import Path

BENCHES = [
    *("ingest", "vqgan", "gpt", "tokenize", "preprocess", "train", "quality"),
    *("gpt_train", "gpt_quality", "sample", "evaluate", "local_attention", "verify"),
]
OUT = Path(__file__).resolve().parents[2] / ".local" / "bench"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument("names", nargs="*", default=BENCHES, help=f"which benchmarks (default all: {BENCHES})")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        mod = importlib.import_module(f"tests.bench.bench_{name}")
        t0 = time.perf_counter()
        result = mod.run(quick=args.quick)
        result["bench_seconds"] = round(time.perf_counter() - t0, 1)
        (OUT / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"== {name}: {json.dumps(result, indent=2)}")


if __name__ == "__main__":
    main()

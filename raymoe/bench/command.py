"""`raymoe bench NAME`: each benchmark lives in raymoe/bench/<name>.py with add_arguments(parser) and run(args)."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "train": "raymoe.bench.train",
    "ep": "raymoe.bench.ep",
    "moe-layer": "raymoe.bench.moe_layer",
    "tune": "raymoe.bench.tune",
    "fidelity": "raymoe.bench.fidelity",
    "lm": "raymoe.bench.lm",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, module_name in BENCHMARKS.items():
        bench_parser = sub.add_parser(name)
        bench_parser.set_defaults(_bench_module=module_name)
        try:
            importlib.import_module(module_name).add_arguments(bench_parser)
        except ModuleNotFoundError:
            pass  # benchmark not written yet


def run(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).run(args) or 0)

"""bench/ goes on the import path (a script run from it, the tests that load one): a script named
like an installed module would shadow it. transformers 5.25 imports the PyPI package `kernels`,
and bench/kernels.py broke every test that builds a tiny checkpoint (and `bench/e2e.py`'s
transformers run) until it was renamed bench/attention_kernels.py."""

from __future__ import annotations

import importlib.machinery
import sys

from bench_scripts import BENCH_DIR

from nanokv.cli import BENCH_SCRIPTS, BENCHMARKS


def test_no_bench_script_is_named_like_an_installed_module():
    elsewhere = [p for p in sys.path if p and p != str(BENCH_DIR)]
    for script in sorted(BENCH_DIR.glob("*.py")):
        found = importlib.machinery.PathFinder.find_spec(script.stem, elsewhere)
        assert found is None, f"bench/{script.name} shadows {found.origin}"


def test_every_benchmark_command_has_its_script():
    assert set(BENCH_SCRIPTS) == set(BENCHMARKS)
    assert all((BENCH_DIR / f"{script}.py").is_file() for script in BENCH_SCRIPTS.values())

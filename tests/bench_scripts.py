"""The scripts of bench/ as modules, for the tests that run their `main`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py imported as the module `bench_<name>`. It is registered in sys.modules
    before it runs (its dataclasses look their module up while defined), and bench/ is on the
    path for a script that imports another."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def assert_refuses(name: str, argv: list[str], message: str, capsys) -> None:
    """bench/<name>.py's `main(argv)` exits with argparse's status 2 and `message` on stderr."""
    import pytest

    with pytest.raises(SystemExit) as exc:
        load_bench(name).main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err

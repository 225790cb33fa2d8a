"""C kernels for the CPU, built on this machine on first use and loaded with ctypes.

Why: a decode step's attention is one query row per head, where torch's CPU SDPA (a flash
kernel made for many rows) reads the cache at a few GB/s, and its projections are GEMVs of one
row, which oneDNN reads below the bandwidth one core has. A few hundred lines of C with vector
extensions, compiled for the machine at hand (`-march=native`), do better (cpu_attention.py
and cpu_linear.py say by how much), and need no build step at install time: a C compiler is
all it takes.

The library is compiled from its source next to this file into a cache directory
(`$NANOKV_NATIVE_CACHE`, default `~/.cache/nanokv/native`), named by a hash of the source (and
the headers beside it), the compiler, its flags and this CPU's feature flags, so that a changed
source or a home directory shared by different machines never loads a stale or foreign build.
It is written to a temporary file and renamed, so a crash mid-build leaves nothing
half-written. Where there is no compiler, the build fails, or `NANOKV_NATIVE=0` is set,
`library` returns None (with one warning line on stderr for a failed build) and callers take
their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).resolve().parent
KINDS = {torch.float32: 0, torch.bfloat16: 1}  # element kinds, KIND_F32 / KIND_BF16 in cpu_vector.h
FLAGS = ("-O3", "-march=native", "-std=c11", "-pthread", "-shared", "-fPIC")


class NativeBuildError(RuntimeError):
    """The C compiler failed or is missing."""


def enabled() -> bool:
    """False where `NANOKV_NATIVE=0` asks for the torch paths only."""
    return os.environ.get("NANOKV_NATIVE", "1") != "0"


def cache_dir() -> Path:
    env = os.environ.get("NANOKV_NATIVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nanokv" / "native"


def compiler() -> str | None:
    """`$CC` if set, else the first of cc, gcc, clang on the PATH."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def cpu_flags() -> str:
    """This CPU's feature flags (Linux's /proc/cpuinfo), or the platform's name elsewhere: a
    `-march=native` build is only valid where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.platform()


def build(name: str, cc: str, out_dir: Path) -> Path:
    """Compiles `<name>.c` of this directory into out_dir (kept where one already matches)."""
    source = SOURCE_DIR / f"{name}.c"
    headers = [path.read_text() for path in sorted(SOURCE_DIR.glob("*.h"))]
    key = "\n".join([source.read_text(), *headers, cc, " ".join(FLAGS), cpu_flags()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = out_dir / f"{name}-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=out_dir, prefix=f".{name}-", suffix=".so")
    os.close(handle)
    try:
        done = subprocess.run(
            [cc, *FLAGS, "-o", partial, str(source)], capture_output=True, text=True
        )
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeBuildError(f"{cc} failed on {source.name}: {first}")
        os.replace(partial, target)
    except OSError as exc:
        raise NativeBuildError(f"{cc} could not build {source.name}: {exc}") from exc
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded library of `<name>.c`, built if needed; None where disabled or not buildable
    (one warning line on stderr then, once a process)."""
    if not enabled():
        return None
    cc = compiler()
    try:
        if cc is None:
            raise NativeBuildError("no C compiler (cc, gcc, clang) on the PATH; set CC")
        return ctypes.CDLL(str(build(name, cc, cache_dir())))
    except (NativeBuildError, OSError) as exc:
        print(f"nanokv: warning: {exc}; using the torch path instead", file=sys.stderr)
        return None


def function(name: str, symbol: str, argtypes: list) -> ctypes._CFuncPtr | None:
    """The C function `symbol` of `<name>.c`, typed (an int status it returns, `argtypes` it
    takes); None where the library is not built."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    if fn.argtypes is None:
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
    return fn

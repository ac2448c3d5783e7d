"""xatl's own CPU kernels, built from source on first use with the machine's C++ compiler.

`int8_linear.cpp` defines `torch.ops.xatl.int8_linear(x, weight, scale, bias, path=0)`: the product
of float32 activations (N, K) with int8 weights (O, K) and one float32 scale per output row, bias
added, activations quantised on the fly in blocks of 32 (llama.cpp's Q8_0 scheme) so that each
product is an integer dot product (AVX512-VNNI, else AVX2, else portable C++; chosen at run time).
`xatl.quantization.Int8Linear` runs it where it is built, torch's `_weight_int8pack_mm` (bfloat16
activations) elsewhere. Measured against that kernel on one core of an AMD EPYC with AVX512-VNNI
(median µs, weights 512 wide; the bandwidth bound is the weight bytes over the copy bandwidth):

| weight (out x in) | rows | `_weight_int8pack_mm` | `xatl::int8_linear` | bound |
|---|---|---|---|---|
| 512 x 512 | 1 | 27.9 | 14.2 | 10.9 |
| 2048 x 512 | 1 | 77.4 | 33.4 | 43.7 |
| 32000 x 512 (LM head) | 1 | 1658 | 585 | 683 |
| 32000 x 512 | 16 | 10485 | 6407 | 683 |

Built once per machine and torch version into `~/.cache/xatl/kernels` (about 10 s on two cores),
written aside and renamed into place, so that processes building at once never load half a file;
an image without a compiler ships it built beside this file (docker/Dockerfile: `build_int8_linear`).
Without a compiler, or if the build fails, `load_int8_linear()` says why in the log and returns
False, and the int8 layers keep torch's kernel.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_linear.cpp")
CACHE_DIR = Path.home() / ".cache" / "xatl" / "kernels"
#: `path` values of the op: 0 asks for the best this CPU has
PATHS = {"portable": 1, "avx2": 2, "avx512-vnni": 3}


def _compiler() -> str | None:
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def _flags() -> list[str]:
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libraries = cpp_extension.library_paths()
    # -fopenmp links libgomp.so.1, which resolves to the one torch has loaded: one thread pool,
    # sized by torch.set_num_threads
    return ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *[f"-I{path}" for path in cpp_extension.include_paths()], *[f"-L{path}" for path in libraries],
            *[f"-Wl,-rpath,{path}" for path in libraries]]


LIBRARIES = ["-ltorch_cpu", "-lc10"]  # after the source, for linkers that drop what nothing before uses


def library_name() -> str:
    """The file name of the built kernel for this source and torch (its flags included)."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags()).encode() + torch.__version__.encode())
    return f"int8_linear-{key.hexdigest()[:16]}.so"


def build_int8_linear(folder: Path) -> Path:
    """Build the kernel into `folder` (written aside, then renamed into place); returns its path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on the PATH")
    library = Path(folder) / library_name()
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        aside = Path(scratch) / library.name
        result = subprocess.run([compiler, *_flags(), str(SOURCE), "-o", str(aside), *LIBRARIES],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr[-2000:]}")
        os.replace(aside, library)  # whole or not at all, for a process loading it meanwhile
    return library


@functools.cache
def load_int8_linear(cache_dir: Path = CACHE_DIR) -> bool:
    """Load `torch.ops.xatl.int8_linear`: built beside this file (an image's, `build_int8_linear`)
    or in `cache_dir`, else built there now (once per machine); False, with the reason in the log,
    where it cannot be built here (then int8 layers use torch's kernel)."""
    if not hasattr(torch.ops.xatl, "int8_linear"):
        built = [folder / library_name() for folder in (SOURCE.parent, Path(cache_dir))]
        try:
            library = next((path for path in built if path.exists()), None) or build_int8_linear(Path(cache_dir))
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as error:
            logger.warning("xatl's int8 kernel is not available (%s): int8 layers use torch's "
                           "_weight_int8pack_mm instead", error)
            return False
        _register_fake()
    logger.info("xatl's int8 kernel loaded (path %s)", int8_linear_path())
    return True


def int8_linear_path() -> str:
    """The path the op takes on this CPU ("avx512-vnni", "avx2" or "portable"); load it first."""
    best = torch.ops.xatl.int8_linear_best_path()
    return next(name for name, number in PATHS.items() if number == best)


def _register_fake() -> None:
    """Shapes for torch.compile: (N, K) by (O, K) gives (N, O) float32."""

    @torch.library.register_fake("xatl::int8_linear")
    def _(x, weight, scale, bias=None, path=0):
        return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["PATHS", "build_int8_linear", "int8_linear_path", "library_name", "load_int8_linear"]

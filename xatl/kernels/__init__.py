"""xatl's own CPU kernels for the decode step's matrix products, built from source on first use with
the machine's C++ compiler.

- `torch.ops.xatl.int8_linear(x, weight, scale, bias, path=0)` (int8_linear.cpp): float32
  activations (N, K) by int8 weights (O, K) with one float32 scale per output row, bias added;
  the activations quantised on the fly in blocks of 32 (llama.cpp's Q8_0 scheme), so that each
  product is an integer dot product (AVX512-VNNI, else AVX2, else portable C++). Run by
  `xatl.quantization.Int8Linear`; without it, torch's `_weight_int8pack_mm` (bfloat16 activations).
- `torch.ops.xatl.bf16_linear(x, weight, bias, path=0)` (bf16_linear.cpp): bfloat16 activations,
  weights and output, float32 sums (AVX512-BF16's vdpbf16ps, else AVX2, else portable C++). Run by
  `xatl.serving.precision.Bf16Linear` in a bf16 model the engine serves; without it, torch's linear.
- `torch.ops.xatl.f32_linear(x, weight, bias, path=0)` (f32_linear.cpp): float32 throughout
  (AVX512F, else AVX2, else portable C++). Run by `xatl.serving.precision.Fp32Linear` in an fp32
  model the engine serves, for a decode step's few rows; without it, torch's linear.

Each picks its path at run time (`path` 0: the best this CPU has; the tests ask for each). Against
torch's kernels on one core (bench/kernels/run.py, bench/results/kernels/<cpu>; median µs of
interleaved calls, random-width512's shapes), torch's / xatl's:

| weight (out x in) | rows | AVX512 int8 | AVX512 bf16 | AVX2 int8 | AVX2 bf16 | AVX2 fp32 |
|---|---|---|---|---|---|---|
| 2048 x 512 | 1 | 67.1 / 26.3 | 100.2 / 33.3 | 207.8 / 81.0 | 313.6 / 118.3 | 334.4 / 239.9 |
| 2048 x 512 | 8 | 242.2 / 162.8 | 157.2 / 123.0 | 764.7 / 323.4 | 2286 / 478 | 1189 / 565 |
| 2048 x 512 | 512 (a prefill chunk) | 15229 / 9490 | 5448 / 7690 | 38848 / 18629 | 140157 / 25095 | 19807 / 21497 |
| 32000 x 512 (LM head) | 1 | 1284 / 738 | 3780 / 1125 | 4539 / 1912 | 5606 / 3803 | 11895 / 6685 |
| 32000 x 512 | 16 | 8230 / 5117 | 6134 / 5577 | 21274 / 8903 | 67157 / 15120 | 33362 / 17141 |

(AVX512: an AMD EPYC with AVX512-VNNI and AVX512-BF16, copy bandwidth 25.9 GB/s, before the fp32
kernel; AVX2: an AMD EPYC without AVX512, 10.7 GB/s. The bound of a weight, its bytes over that
bandwidth, is 40.5 µs int8 and 81.1 µs bf16 for 2048 x 512 with AVX512, 98, 196 and 393 µs int8,
bf16 and fp32 with AVX2; a loop over the same weight may find it in the cache, as the bf16 LM head
did.) So `Bf16Linear` runs xatl's kernel for up to 8 rows only where torch has AVX512-BF16, for any
number of rows elsewhere; `Fp32Linear` for up to 8 rows (torch's, MKL's, is faster for 512); the
int8 one is faster at every size on both.

The AVX2 paths multiply tiles of up to 4 weight rows, prefetching the next tile: their rows are a
row apart, streams too short for the hardware prefetcher (without it the LM head took twice as
long as one row at a time).

Built once per machine and torch version into `~/.cache/xatl/kernels` (about 20 s on two cores),
written aside and renamed into place, so that processes building at once never load half a file;
an image without a compiler ships them built beside this file (docker/Dockerfile: `build_kernels`).
Without a compiler, or if the build fails, `load_kernels()` says why in the log and returns False,
and the layers keep torch's kernels.
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

FOLDER = Path(__file__).parent
# and the header they share, tiles.h
SOURCES = [FOLDER / "int8_linear.cpp", FOLDER / "bf16_linear.cpp", FOLDER / "f32_linear.cpp"]
CACHE_DIR = Path.home() / ".cache" / "xatl" / "kernels"
#: `path` values of the op: 0 asks for the best this CPU has
PATHS = {"portable": 1, "avx2": 2, "avx512-vnni": 3, "avx512-bf16": 4, "avx512": 5}


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
    """The file name of the built kernels for these sources and torch (their flags included)."""
    key = hashlib.sha256(b"".join(path.read_bytes() for path in [*SOURCES, FOLDER / "tiles.h"])
                         + " ".join(_flags()).encode() + torch.__version__.encode())
    return f"xatl_kernels-{key.hexdigest()[:16]}.so"


def build_kernels(folder: Path) -> Path:
    """Build the kernels into `folder` (written aside, then renamed into place); returns the path."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on the PATH")
    library = Path(folder) / library_name()
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
        aside = Path(scratch) / library.name
        result = subprocess.run([compiler, *_flags(), *map(str, SOURCES), "-o", str(aside), *LIBRARIES],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr[-2000:]}")
        os.replace(aside, library)  # whole or not at all, for a process loading it meanwhile
    return library


@functools.cache
def load_kernels(cache_dir: Path = CACHE_DIR) -> bool:
    """Load `torch.ops.xatl.int8_linear`, `bf16_linear` and `f32_linear`: built beside this file (an image's,
    `build_kernels`) or in `cache_dir`, else built there now (once per machine); False, with the
    reason in the log, where they cannot be built here (then the layers use torch's kernels)."""
    if not hasattr(torch.ops.xatl, "int8_linear"):
        built = [folder / library_name() for folder in (FOLDER, Path(cache_dir))]
        try:
            library = next((path for path in built if path.exists()), None) or build_kernels(Path(cache_dir))
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as error:
            logger.warning("xatl's CPU kernels are not available (%s): int8 layers use torch's "
                           "_weight_int8pack_mm instead, bf16 and fp32 ones torch's linear", error)
            return False
        _register_fakes()
    logger.info("xatl's CPU kernels loaded (int8: %s path, bf16: %s path, fp32: %s path)",
                kernel_path("int8"), kernel_path("bf16"), kernel_path("fp32"))
    return True


def kernel_path(precision: str) -> str:
    """The path the kernel of `precision` (int8, bf16, fp32) takes on this CPU ("avx512-vnni",
    "avx512-bf16" or "avx512", "avx2", "portable"); load the kernels first."""
    best = {"int8": torch.ops.xatl.int8_linear_best_path, "bf16": torch.ops.xatl.bf16_linear_best_path,
            "fp32": torch.ops.xatl.f32_linear_best_path}[precision]()
    return next(name for name, number in PATHS.items() if number == best)


def _register_fakes() -> None:
    """Shapes for torch.compile: (N, K) by (O, K) gives (N, O), of x's dtype."""

    @torch.library.register_fake("xatl::int8_linear")
    def _(x, weight, scale, bias=None, path=0):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("xatl::bf16_linear")
    def _(x, weight, bias=None, path=0):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("xatl::f32_linear")
    def _(x, weight, bias=None, path=0):
        return x.new_empty(x.shape[0], weight.shape[0])


__all__ = ["PATHS", "build_kernels", "kernel_path", "library_name", "load_kernels"]

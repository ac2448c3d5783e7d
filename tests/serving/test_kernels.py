"""xatl's int8 kernel (`torch.ops.xatl.int8_linear`): every path this CPU has equals the same
block-quantised product computed in float64, stays close to the float product, refuses bad input,
compiles, runs on two threads, and where it cannot be built the int8 layers keep torch's kernel."""

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from xatl.kernels import CACHE_DIR, PATHS, SOURCE, int8_linear_path, library_name, load_int8_linear
from xatl.quantization import Int8Linear, use_int8_kernel

pytestmark = pytest.mark.skipif(not load_int8_linear(), reason="no C++ compiler to build the kernel")


def available_paths() -> list[str]:
    order = list(PATHS)  # from the most portable to the fastest
    return order[: order.index(int8_linear_path()) + 1]


def block_quantised_reference(x, weight, scale, bias):
    """The product as the kernel defines it, in float64: x quantised to int8 in blocks of 32 (one
    scale per block: its largest magnitude maps to 127), integer dot products per block."""
    n, k = x.shape
    blocks = x.view(n, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)))  # (N, K/32, 32)
    dots = torch.einsum("nbi,obi->nob", q.double(), weight.view(-1, k // 32, 32).double())  # (N, O, K/32)
    out = (dots * (amax / 127).double().view(n, 1, -1)).sum(-1) * scale.double()
    return (out if bias is None else out + bias.double()).float()


def random_problem(rows, in_features, out_features, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[0, :32] = 0  # a block of zeros: scale 0
    weight = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scale = torch.rand(out_features, generator=generator) / 64
    return x, weight, scale, (torch.randn(out_features, generator=generator) if bias else None)


@pytest.mark.parametrize("shape", [(1, 512, 512), (3, 96, 77), (16, 512, 130), (17, 2048, 33), (5, 32, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_path_equals_the_block_quantised_product(shape, bias):
    x, weight, scale, b = random_problem(*shape, bias=bias)
    expected = block_quantised_reference(x, weight, scale, b)
    spread = expected.abs().max()
    for path in available_paths():
        got = torch.ops.xatl.int8_linear(x, weight, scale, b, PATHS[path])
        assert got.shape == expected.shape and got.dtype == torch.float32
        # the same integers per block; the paths differ only in the order of their float additions
        assert (got - expected).abs().max() <= 1e-5 * spread, path
    exact = x @ (weight.float() * scale[:, None]).T + (0 if b is None else b)  # activations unquantised
    assert (torch.ops.xatl.int8_linear(x, weight, scale, b) - exact).norm() <= 1e-2 * exact.norm()


def test_two_threads_give_what_one_gives():
    x, weight, scale, bias = random_problem(16, 512, 4096)
    one = torch.ops.xatl.int8_linear(x, weight, scale, bias)
    torch.set_num_threads(2)  # the autouse fixture sets it back
    assert torch.equal(torch.ops.xatl.int8_linear(x, weight, scale, bias), one)


def test_bad_input_is_refused_with_the_reason():
    x, weight, scale, bias = random_problem(2, 64, 8)
    cases = {
        "multiple of 32": (torch.randn(2, 48), torch.zeros(8, 48, dtype=torch.int8), scale, bias),
        "float32 \\(N, K\\)": (x.double(), weight, scale, bias),
        "int8 \\(O, K\\)": (x, weight.float(), scale, bias),
        "x has 64 columns": (x, weight[:, :32].contiguous(), scale, bias),
        "scale must hold O": (x, weight, scale[:4], bias),
        "bias must hold O": (x, weight, scale, bias[:4]),
    }
    for message, args in cases.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.xatl.int8_linear(*args)
    with pytest.raises(RuntimeError, match="no path 7"):
        torch.ops.xatl.int8_linear(x, weight, scale, bias, 7)


def test_int8_linear_runs_it_where_the_width_allows_and_torch_elsewhere():
    torch.manual_seed(0)
    for in_features, kernel in [(64, "xatl"), (48, "torch"), (100, "torch")]:
        layer = Int8Linear.from_linear(torch.nn.Linear(in_features, 24))
        assert layer.kernel == "xatl"
        x = torch.randn(2, 3, in_features)
        flat = x.reshape(-1, in_features)
        if kernel == "xatl":
            expected = torch.ops.xatl.int8_linear(flat, layer.weight, layer.weight_scale, layer.bias)
            assert torch.equal(layer(x), expected.view(2, 3, 24))
        torch.testing.assert_close(layer(x), layer.dequantized()(x), atol=3e-2, rtol=2e-2)
        assert layer(x.bfloat16()).dtype == torch.bfloat16


def test_use_int8_kernel_switches_every_layer_and_refuses_unknown_kernels():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    for i in (0, 2):
        model[i] = Int8Linear.from_linear(model[i])
    x = torch.randn(4, 64)
    ours = model(x)
    use_int8_kernel(model, "torch")
    assert [m.kernel for m in model if isinstance(m, Int8Linear)] == ["torch", "torch"]
    theirs = model(x)
    assert not torch.equal(ours, theirs)  # bfloat16 against blocks of int8: close, not equal
    torch.testing.assert_close(ours, theirs, atol=3e-2, rtol=3e-2)
    with pytest.raises(ValueError, match="kernel must be one of xatl, torch"):
        use_int8_kernel(model, "fbgemm")


def test_it_compiles_with_dynamic_shapes():
    layer = Int8Linear.from_linear(torch.nn.Linear(64, 40))
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for rows in (1, 3, 7):
        x = torch.randn(rows, 64)
        assert torch.equal(compiled(x), layer(x))


def run_without_a_compiler(script: str, home) -> subprocess.CompletedProcess:
    """`script` in a process of its own (this one has loaded the op already) with an empty PATH (no
    c++, g++ or clang++) and `home` as its home (whose .cache/xatl/kernels is the kernel's cache)."""
    prelude = f"import os\nos.environ['PATH'] = ''\nos.environ['HOME'] = {str(home)!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300)


def test_without_a_compiler_the_int8_layers_keep_torchs_kernel(tmp_path):
    done = run_without_a_compiler("""
        import logging
        logging.basicConfig()
        import torch
        from xatl.kernels import CACHE_DIR, load_int8_linear
        from xatl.quantization import Int8Linear
        assert load_int8_linear() is False
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 8))
        assert layer.kernel == "torch", layer.kernel
        layer(torch.randn(2, 64))
        assert not CACHE_DIR.exists() or list(CACHE_DIR.iterdir()) == []
    """, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no C++ compiler" in done.stderr and "_weight_int8pack_mm instead" in done.stderr


def test_a_kernel_built_elsewhere_loads_without_a_compiler(tmp_path):
    # as an image without a compiler ships it: built (here: by this machine's first load) and copied
    built = next(path for path in (SOURCE.parent / library_name(), CACHE_DIR / library_name()) if path.exists())
    cache = tmp_path / ".cache" / "xatl" / "kernels"
    cache.mkdir(parents=True)
    shutil.copy(built, cache / built.name)
    done = run_without_a_compiler("""
        import torch
        from xatl.kernels import load_int8_linear
        from xatl.quantization import Int8Linear
        assert load_int8_linear() is True
        assert Int8Linear.from_linear(torch.nn.Linear(64, 8)).kernel == "xatl"
    """, home=tmp_path)
    assert done.returncode == 0, done.stderr

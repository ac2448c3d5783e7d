"""xatl's CPU kernels (`torch.ops.xatl.int8_linear`, `bf16_linear`, `f32_linear`): every path this CPU has equals
the product computed in float64 (int8: of the block-quantised activations) and stays close to the
float product, refuses bad input, compiles, runs on two threads; the layers that run them; and
where they cannot be built the layers keep torch's kernels."""

import copy
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from xatl.kernels import CACHE_DIR, FOLDER, PATHS, kernel_path, library_name, load_kernels
from xatl.quantization import Int8Linear, use_int8_kernel

HAS_COMPILER = any(shutil.which(name) for name in ("c++", "g++", "clang++"))
# where there is a compiler the kernels must build: a build that fails fails these tests
pytestmark = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler to build the kernels")


def test_the_kernels_build_and_load_where_there_is_a_compiler():
    assert load_kernels()
    assert all(kernel_path(precision) in PATHS for precision in ("int8", "bf16", "fp32"))


def available_paths(precision: str) -> list[str]:
    best = kernel_path(precision)
    return ["portable"] + (["avx2"] if best != "portable" else []) + ([best] if best.startswith("avx512") else [])


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


# rows and outputs that leave every tile size of the paths (4, 2 or 1 weight rows; 1-4 activation
# rows) a remainder somewhere
@pytest.mark.parametrize("shape", [(1, 512, 512), (2, 64, 10), (3, 96, 77), (16, 512, 130), (17, 2048, 33), (5, 32, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_path_equals_the_block_quantised_product(shape, bias):
    x, weight, scale, b = random_problem(*shape, bias=bias)
    expected = block_quantised_reference(x, weight, scale, b)
    spread = expected.abs().max()
    for path in available_paths("int8"):
        got = torch.ops.xatl.int8_linear(x, weight, scale, b, PATHS[path])
        assert got.shape == expected.shape and got.dtype == torch.float32
        # the same products per block; the paths differ only in their float additions
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


# ---- bf16 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 512, 512), (1, 64, 7), (2, 64, 10), (3, 96, 77), (16, 512, 130), (5, 32, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_bf16_path_equals_the_float64_product_rounded_once(shape, bias):
    rows, in_features, out_features = shape
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    b = torch.randn(out_features, generator=generator).bfloat16() if bias else None
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    for path in available_paths("bf16"):
        got = torch.ops.xatl.bf16_linear(x, weight, b, PATHS[path])
        assert got.dtype == torch.bfloat16 and got.shape == exact.shape
        # float32 sums (in their own order), then one rounding to bfloat16: half a unit in the last place
        assert ((got.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * exact.abs().max()).all(), path
    torch.testing.assert_close(torch.ops.xatl.bf16_linear(x, weight, b), torch.nn.functional.linear(x, weight, b),
                               atol=1e-2 * exact.abs().max().item(), rtol=1e-2)


def test_bf16_bad_input_is_refused_with_the_reason():
    x, weight = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    for message, args in {
        "multiple of 32": (torch.randn(2, 48).bfloat16(), torch.randn(8, 48).bfloat16(), None),
        "bfloat16 \\(N, K\\)": (x.float(), weight, None),
        "bfloat16 \\(O, K\\)": (x, weight.float(), None),
        "bias must hold O": (x, weight, torch.zeros(4).bfloat16()),
    }.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.xatl.bf16_linear(*args)
    with pytest.raises(RuntimeError, match="no path 3"):  # AVX512-VNNI is int8's
        torch.ops.xatl.bf16_linear(x, weight, None, 3)


def test_a_bf16_engine_runs_its_linear_layers_on_the_kernel_and_saves_as_before(tokenizer, tmp_path):
    from serving_fixtures import plans, tiny_model

    from xatl.serving import Engine, SamplingParams
    from xatl.serving.precision import Bf16Linear

    model = tiny_model(plans()["gla"], len(tokenizer))
    expected_keys = set(model.state_dict())
    engine = Engine(model, tokenizer, background=False, precision="bf16")
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Bf16Linear for m in linears)
    if engine.model.config.tie_word_embeddings:  # swapped, not copied: the LM head stays tied
        assert engine.model.lm_head.weight is engine.model.get_input_embeddings().weight
    prompt = tokenizer("Once upon a time")["input_ids"]
    events = list(engine.submit(prompt, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)))
    assert len(events) == 6 and events[-1].finish_reason == "length"
    head = engine.model.lm_head
    # a decode step's few rows run the kernel; a prefill's many, torch's linear where it has AVX512-BF16
    assert head.max_rows == (8 if kernel_path("bf16") == "avx512-bf16" else None)
    many = torch.nn.functional.linear if head.max_rows else torch.ops.xatl.bf16_linear
    with torch.no_grad():
        for rows, expected in ((1, torch.ops.xatl.bf16_linear), ((head.max_rows or 64) + 1, many)):
            x = torch.randn(rows, head.in_features).bfloat16()
            assert torch.equal(head(x), expected(x, head.weight, head.bias))
        ours = engine.model(torch.tensor([prompt])).logits.float()
        for layer in linears:
            layer.kernel = "torch"
        theirs = engine.model(torch.tensor([prompt])).logits.float()
    # the same products up to the order of their float additions, rounded to bfloat16 between layers
    torch.testing.assert_close(ours, theirs, atol=0.03 * (theirs.max() - theirs.min()).item(), rtol=0)
    assert set(engine.model.state_dict()) == expected_keys
    engine.model.save_pretrained(tmp_path)
    assert "Bf16Linear" not in (tmp_path / "config.json").read_text()


def test_bf16_linear_compiles_and_trains_as_nn_linear():
    from xatl.serving.precision import Bf16Linear

    layer = Bf16Linear(64, 40, dtype=torch.bfloat16)
    reference = torch.nn.Linear(64, 40, dtype=torch.bfloat16)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64).bfloat16()
    with torch.no_grad():
        compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
        for rows in (1, 3):
            assert torch.equal(compiled(x[:rows]), layer(x[:rows]))
    # with gradients: nn.Linear's forward, bit for bit
    assert torch.equal(layer(x), reference(x))
    layer(x).float().sum().backward()
    assert layer.weight.grad is not None


# ---- fp32 ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 512, 512), (2, 64, 10), (3, 96, 77), (16, 512, 130), (5, 32, 1)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_every_fp32_path_equals_the_float64_product(shape, bias):
    rows, in_features, out_features = shape
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    b = torch.randn(out_features, generator=generator) if bias else None
    exact = x.double() @ weight.double().T + (0 if b is None else b.double())
    # float32 products and sums: their rounding, K of them, against the sum of magnitudes
    tolerance = in_features * 2**-23 * (x.double().abs() @ weight.double().abs().T + (0 if b is None else b.abs()))
    for path in available_paths("fp32"):
        got = torch.ops.xatl.f32_linear(x, weight, b, PATHS[path])
        assert got.dtype == torch.float32 and got.shape == exact.shape
        assert ((got.double() - exact).abs() <= tolerance).all(), path


def test_fp32_bad_input_is_refused_with_the_reason():
    x, weight = torch.randn(2, 64), torch.randn(8, 64)
    for message, args in {
        "multiple of 32": (torch.randn(2, 48), torch.randn(8, 48), None),
        "float32 \\(N, K\\)": (x.double(), weight, None),
        "float32 \\(O, K\\)": (x, weight.bfloat16(), None),
        "bias must hold O": (x, weight, torch.zeros(4)),
    }.items():
        with pytest.raises(RuntimeError, match=message):
            torch.ops.xatl.f32_linear(*args)
    with pytest.raises(RuntimeError, match="no path 4"):  # AVX512-BF16 is bf16's
        torch.ops.xatl.f32_linear(x, weight, None, 4)


def test_an_fp32_engine_decodes_on_the_kernel_and_prefills_on_torchs_linear(tokenizer):
    from serving_fixtures import plans, tiny_model

    from xatl.serving import Engine, SamplingParams
    from xatl.serving.precision import Fp32Linear

    model = tiny_model(plans()["gla"], len(tokenizer))
    reference = Engine(copy.deepcopy(model), tokenizer, background=False, compile="off")
    for layer in reference.model.modules():
        if isinstance(layer, Fp32Linear):
            layer.kernel = "torch"
    engine = Engine(model, tokenizer, background=False, compile="off")
    linears = [m for m in engine.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is Fp32Linear for m in linears)
    head = engine.model.lm_head
    with torch.no_grad():
        for rows, expected in ((1, torch.ops.xatl.f32_linear), (head.max_rows + 1, torch.nn.functional.linear)):
            x = torch.randn(rows, head.in_features)
            assert torch.equal(head(x), expected(x, head.weight, head.bias))
    prompt = tokenizer("Once upon a time")["input_ids"]
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    tokens = [[event.token_id for event in e.submit(prompt, greedy)] for e in (engine, reference)]
    assert tokens[0] == tokens[1]


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
        from xatl.kernels import CACHE_DIR, load_kernels
        from xatl.quantization import Int8Linear
        assert load_kernels() is False
        layer = Int8Linear.from_linear(torch.nn.Linear(64, 8))
        assert layer.kernel == "torch", layer.kernel
        layer(torch.randn(2, 64))
        assert not CACHE_DIR.exists() or list(CACHE_DIR.iterdir()) == []
    """, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no C++ compiler" in done.stderr and "_weight_int8pack_mm instead" in done.stderr


def test_a_kernel_built_elsewhere_loads_without_a_compiler(tmp_path):
    # as an image without a compiler ships it: built (here: by this machine's first load) and copied
    built = next(path for path in (FOLDER / library_name(), CACHE_DIR / library_name()) if path.exists())
    cache = tmp_path / ".cache" / "xatl" / "kernels"
    cache.mkdir(parents=True)
    shutil.copy(built, cache / built.name)
    done = run_without_a_compiler("""
        import torch
        from xatl.kernels import load_kernels
        from xatl.quantization import Int8Linear
        assert load_kernels() is True
        assert Int8Linear.from_linear(torch.nn.Linear(64, 8)).kernel == "xatl"
    """, home=tmp_path)
    assert done.returncode == 0, done.stderr

"""The CUDA paths: every mixer plan gives on CUDA what it gives on the CPU (outputs and gradients),
the engine decodes on CUDA exactly as the parallel forward predicts, and training runs under bf16
and fp16 autocast. Where mamba_ssm / causal-conv1d are installed, the Mamba mixers run their kernels
here, so these also compare the kernels with the CPU reference. Skipped without CUDA."""

import copy

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import xatl
from xatl.mixers import MIXERS
from xatl.serving import Engine, SamplingParams
from xatl.training import TrainConfig, train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LINEAR = [name for name in MIXERS if name != "attention"]
PLANS = {
    "attention": ["attention"] * 2,
    **{name: [name, name] for name in LINEAR},
    **{f"{name}+attention": [name, "attention"] for name in LINEAR},
}
VOCAB = 97


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 matmuls and convolutions would differ from the CPU by ~1e-3; compare in true fp32."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Token i is the word `w<i>`: enough for the engine's detokenizer."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiny_model(plan, seed=0):
    torch.manual_seed(seed)
    return xatl.XatlForCausalLM(xatl.XatlConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(plan),
        num_attention_heads=4, num_key_value_heads=2, layer_mixers=plan,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    ))


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_cuda_matches_cpu_outputs_and_grads(plan):
    cpu = tiny_model(plan)
    gpu = copy.deepcopy(cpu).cuda()
    ids = torch.randint(3, VOCAB, (2, 150), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (cpu, gpu):
        out = model(input_ids=ids.to(model.device), labels=ids.to(model.device))
        out.loss.backward()
        results.append((out.logits, [p.grad for p in model.parameters()]))
    (cpu_logits, cpu_grads), (gpu_logits, gpu_grads) = results
    torch.testing.assert_close(gpu_logits.cpu(), cpu_logits, atol=2e-4, rtol=2e-4)
    for (name, _), a, b in zip(cpu.named_parameters(), cpu_grads, gpu_grads):
        torch.testing.assert_close(b.cpu(), a, atol=2e-4, rtol=2e-3, msg=name)


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_engine_on_cuda_decodes_what_the_parallel_forward_predicts(plan):
    model = tiny_model(plan).cuda().eval()
    engine = Engine(model, word_tokenizer(), background=False)
    prompts = [[1, 5, 9, 13, 21], [1, 40, 41], [1, 7, 7, 7, 7, 7, 7, 8]]
    streams = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True))
               for p in prompts]
    for prompt, stream in zip(prompts, streams):
        tokens = [e.token_id for e in stream if e.token_id is not None]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens], device="cuda")).logits[0, len(prompt) - 1:-1]
        assert logits.argmax(-1).tolist() == tokens


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_under_autocast_on_cuda(precision):
    model = tiny_model(["mamba2", "gla", "attention", "mamba", "retention"]).cuda()
    generator = torch.Generator().manual_seed(0)
    # a learnable stream: each block repeats a short random pattern
    blocks = [torch.randint(3, VOCAB, (8,), generator=generator).repeat(8) for _ in range(64)]
    events = []
    config = TrainConfig(max_steps=30, batch_size=8, lr=3e-3, warmup_steps=3, precision=precision)
    train(model, blocks, config, on_step=events.append)
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0

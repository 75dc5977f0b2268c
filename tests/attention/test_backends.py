"""The backend kernels on their own: each agrees with SDPA (masks included); configs and services
refuse what they cannot take."""

from __future__ import annotations

import pytest
import torch

from diffcaps import attention
from diffcaps.attention import BackendName
from diffcaps.attention._backends import kernel_for
from diffcaps.attention.spec import AttentionSupport
from diffcaps.errors import AttentionError
from diffcaps.layers import AttentionKernel, attention_kernel, module_attention, set_attention_kernel
from diffcaps.layers import attention as sdpa
from diffcaps.models.flux._attention import FluxAttention
from diffcaps.services import ModuleTypes

CPU_BACKENDS: tuple[BackendName, ...] = ("math", "flex")
GPU_BACKENDS: tuple[BackendName, ...] = ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash", "sage", "xformers")


def _qkv(seed: int = 0, queries: int = 7, keys: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, queries, 3, 8, generator=generator), torch.randn(2, keys, 3, 8, generator=generator),
            torch.randn(2, keys, 3, 8, generator=generator))


def _kernel(name: BackendName) -> AttentionKernel:
    kernel = kernel_for(name)
    assert kernel is not None and kernel.name == name
    return kernel


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_cpu_backends_match_sdpa_with_and_without_masks(name: BackendName, mask_kind: str | None) -> None:
    query, key, value = _qkv()
    mask: torch.Tensor | None = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 7, 5, generator=torch.Generator().manual_seed(3)) > 0.3
        mask[..., 0] = True  # every query keeps a key
    elif mask_kind == "float":
        mask = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(4))
    expected = sdpa(query, key, value, mask)
    got = _kernel(name).run(query, key, value, mask)
    assert got.shape == expected.shape == (2, 7, 3, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_math_computes_in_float32() -> None:
    query, key, value = (t.to(torch.bfloat16) for t in _qkv())
    got = _kernel("math").run(query, key, value, None)
    reference = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", query.float(), key.float()) / 8**0.5, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", reference, value.float())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_module_attention_reads_the_kernel_set_on_the_module() -> None:
    module = torch.nn.Linear(1, 1)
    query, key, value = _qkv()
    assert torch.equal(module_attention(module, query, key, value), sdpa(query, key, value))
    marker = AttentionKernel("marker", lambda q, k, v, m: q * 0 + 7)
    set_attention_kernel(module, marker)
    assert attention_kernel(module) is marker
    assert torch.equal(module_attention(module, query, key, value), torch.full_like(query, 7.0))
    set_attention_kernel(module, None)
    assert attention_kernel(module) is None and "_diffcaps_attention_kernel" not in module.__dict__


def test_config_refuses_unknown_and_non_string_backends() -> None:
    assert attention.AttentionConfig().backend == "sdpa"
    with pytest.raises(AttentionError, match="unknown attention backend 'cuda'.*sdpa, math, flex"):
        attention.AttentionConfig(backend="cuda")  # type: ignore[arg-type]
    with pytest.raises(AttentionError, match="must be a non-empty string"):
        attention.AttentionConfig(backend=3)  # type: ignore[arg-type]


def test_support_checks_its_backends() -> None:
    modules = ModuleTypes((FluxAttention,))
    assert AttentionSupport(modules=modules).backends == attention.BACKENDS
    assert AttentionSupport(modules=modules, backends=("math", "sdpa")).backends == ("sdpa", "math")
    with pytest.raises(ValueError, match="unknown attention backends"):
        AttentionSupport(modules=modules, backends=("sdpa", "fast"))
    with pytest.raises(ValueError, match="must list 'sdpa'"):
        AttentionSupport(modules=modules, backends=("math",))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backends_are_refused_without_cuda_and_say_what_is_missing(name: BackendName) -> None:
    from tests.flux_fixtures import TINY, seeded_model

    model = seeded_model(TINY)
    with pytest.raises(AttentionError, match=f"the '{name}' attention backend cannot run: .*(pip install|CUDA)"):
        attention.enable(model, attention.AttentionConfig(backend=name))
    assert attention.active(model) is None
    assert all(attention_kernel(m) is None for m in model.modules())

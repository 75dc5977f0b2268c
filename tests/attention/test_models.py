"""The attention feature on Flux and Wan: backends agree, switching is exact and scoped, metadata
shows the row, and LoRA, caches and context parallelism behave as documented."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from diffcaps import attention, cache, parallel
from diffcaps.attention import BackendName
from diffcaps.errors import AttentionError, CapabilityError, ParallelError
from diffcaps.layers import attention_kernel
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from tests import flux_fixtures, wan_fixtures
from tests.custom_model import TinyDiT, TinyDiTConfig
from tests.parallel._worker import add_lora

BACKENDS = ("sdpa", "math", "flex", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash", "sage", "xformers")
CPU_BACKENDS: tuple[BackendName, ...] = ("math", "flex")


def _flux() -> tuple[FluxTransformer2DModel, dict[str, Any]]:
    return flux_fixtures.seeded_model(flux_fixtures.TINY), flux_fixtures.flux_inputs(flux_fixtures.TINY)


def _wan(name: str) -> tuple[WanTransformer3DModel, dict[str, Any]]:
    config = wan_fixtures.CONFIGS[name]
    return wan_fixtures.seeded_model(config), dict(wan_fixtures.wan_inputs(config))


def _run(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**inputs).sample
    return out


def _kernels(model: torch.nn.Module) -> set[str | None]:
    support = getattr(model, "capabilities").attention
    return {getattr(attention_kernel(m), "name", None) for m in model.modules() if support.modules.matches(m)}


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_flux_backends_agree_with_sdpa(name: BackendName) -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    attention.enable(model, attention.AttentionConfig(backend=name))
    assert _kernels(model) == {name}
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", ["t2v", "i2v"])
@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_wan_backends_agree_with_sdpa(name: BackendName, config: str) -> None:
    model, inputs = _wan(config)
    expected = _run(model, inputs)
    attention.enable(model, attention.AttentionConfig(backend=name))
    assert _kernels(model) == {name}  # self- and cross-attention (image tokens too for i2v)
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)


def test_enable_disable_active_and_the_scoped_switch() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    assert attention.active(model) is None and _kernels(model) == {None}
    attention.enable(model, attention.AttentionConfig(backend="math"))
    assert attention.active(model) == attention.AttentionConfig(backend="math")
    with attention.backend(model, "flex"):
        assert attention.active(model) == attention.AttentionConfig(backend="flex") and _kernels(model) == {"flex"}
    assert attention.active(model) == attention.AttentionConfig(backend="math") and _kernels(model) == {"math"}
    attention.disable(model)
    assert attention.active(model) is None and _kernels(model) == {None}
    assert torch.equal(_run(model, inputs), expected)  # sdpa again, bit for bit
    with pytest.raises(RuntimeError, match="inside"):
        with attention.backend(model, "math"):
            raise RuntimeError("inside")
    assert attention.active(model) is None and _kernels(model) == {None}
    attention.enable(model)
    assert attention.active(model) == attention.AttentionConfig() and _kernels(model) == {None}


def test_refusals_leave_the_model_unchanged() -> None:
    model, _ = _flux()
    attention.enable(model, attention.AttentionConfig(backend="math"))
    with pytest.raises(AttentionError, match="config must be a AttentionConfig"):
        attention.enable(model, "flex")  # type: ignore[arg-type]
    with pytest.raises(AttentionError, match="unknown attention backend 'fast'"):
        with attention.backend(model, "fast"):  # type: ignore[arg-type]
            pass
    assert attention.active(model) == attention.AttentionConfig(backend="math") and _kernels(model) == {"math"}
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'attention'"):
        attention.enable(TinyDiT(TinyDiTConfig()))  # type: ignore[arg-type]
    assert attention.active(TinyDiT(TinyDiTConfig())) is None  # type: ignore[arg-type]


def test_a_backend_the_model_does_not_declare_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import attrs

    from diffcaps.attention.spec import AttentionSupport

    model, _ = _flux()
    narrow = AttentionSupport(modules=model.capabilities.attention.modules, backends=("sdpa", "math"))
    evolved = attrs.evolve(model.capabilities, attention=narrow)
    monkeypatch.setattr(FluxTransformer2DModel, "capabilities", property(lambda self: evolved))
    with pytest.raises(AttentionError, match="does not declare the 'flex' attention backend; it declares sdpa, math"):
        attention.enable(model, attention.AttentionConfig(backend="flex"))
    assert attention.active(model) is None and _kernels(model) == {None}


def test_metadata_rows_list_modules_and_backends() -> None:
    flux_row = FluxTransformer2DModel.metadata()["attention"]
    assert flux_row.entries[:10] == ("FluxAttention", *BACKENDS)  # then the fused groups (test_fusion.py)
    assert flux_row.docs == "README.md#attention-backends"
    wan_row = WanTransformer3DModel.metadata()["attention"]
    assert wan_row.entries[:11] == ("WanSelfAttention", "WanCrossAttention", *BACKENDS)


def test_lora_is_unaffected() -> None:
    model, inputs = _flux()
    add_lora(model)
    expected = _run(model, inputs)
    attention.enable(model, attention.AttentionConfig(backend="math"))
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    assert not any("attention" in key for key in model.state_dict())


def test_caches_are_unaffected() -> None:
    def steps(model: FluxTransformer2DModel, inputs: dict[str, Any]) -> list[torch.Tensor]:
        outs = []
        for t in (0.5, 0.49, 0.48, 0.47):
            inputs["timestep"] = torch.tensor([t])
            with cache.context(model, "cond", timestep=t * 1000):
                outs.append(_run(model, inputs))
        return outs

    model, inputs = _flux()
    cache.enable(model, cache.FirstBlockCacheConfig(threshold=0.5))
    expected = steps(model, inputs)
    before = cache.stats(model)
    cache.disable(model)
    cache.enable(model, cache.FirstBlockCacheConfig(threshold=0.5))
    attention.enable(model, attention.AttentionConfig(backend="math"))
    for got, want in zip(steps(model, inputs), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    after = cache.stats(model)
    assert after == before and after.skipped() > 0  # the same steps were skipped


def test_context_parallel_refuses_a_backend_without_log_sum_exp() -> None:
    model, _ = _flux()
    attention.enable(model, attention.AttentionConfig(backend="flex"))
    with pytest.raises(ParallelError, match="runs the 'flex' attention backend, which ring attention cannot merge"):
        parallel.enable(model)  # refused before it looks for a process group
    assert parallel.active(model) is None


@pytest.mark.usefixtures("one_rank")
def test_attention_enable_while_context_parallel_is_on() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    parallel.enable(model)
    with pytest.raises(AttentionError, match="context parallelism is enabled.*'flex'"):
        attention.enable(model, attention.AttentionConfig(backend="flex"))
    assert attention.active(model) is None and _kernels(model) == {None}
    attention.enable(model, attention.AttentionConfig(backend="math"))  # math runs under context parallelism
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    parallel.disable(model)
    attention.disable(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash", "sage", "xformers"])
def test_gpu_backends_agree_with_sdpa(name: BackendName) -> None:
    from diffcaps.attention._backends import missing

    lacking = missing(name)
    if lacking is not None:
        pytest.skip(f"{name}: {lacking}")
    model, inputs = _flux()
    model = model.to("cuda", torch.bfloat16)
    inputs = {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
    expected = _run(model, inputs).float()
    attention.enable(model, attention.AttentionConfig(backend=name))
    torch.testing.assert_close(_run(model, inputs).float(), expected, atol=3e-2, rtol=3e-2)

"""QKV fusion on Flux and Wan: outputs equal unfused and diffusers' fused models, unfusing is
bit-exact, the state dict keeps the diffusers layout, refusals change nothing, and the other
features either work fused or refuse with a named error."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import nn

from diffcaps import attention, cache, casting, lora, offload, parallel
from diffcaps import compile as regional_compile
from diffcaps.attention.spec import AttentionSupport, QKVFusion, QKVGroup
from diffcaps.casting import LayerwiseCastingConfig
from diffcaps.compile import RegionalCompileConfig
from diffcaps.errors import AttentionError, CapabilityError, LoRAError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.wan import WanTransformer3DModel
from diffcaps.offload import GroupOffloadingConfig
from diffcaps.services import ModuleTypes
from tests import flux_fixtures, wan_fixtures
from tests.custom_model import TinyDiT, TinyDiTConfig
from tests.parallel._worker import add_lora, lora_file

Model = FluxTransformer2DModel | WanTransformer3DModel


def _flux(dtype: torch.dtype = torch.float32) -> tuple[FluxTransformer2DModel, dict[str, Any]]:
    model = flux_fixtures.seeded_model(flux_fixtures.TINY).to(dtype)
    inputs = flux_fixtures.flux_inputs(flux_fixtures.TINY, batch=2)
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _wan(name: str, dtype: torch.dtype = torch.float32) -> tuple[WanTransformer3DModel, dict[str, Any]]:
    config = wan_fixtures.CONFIGS[name]
    inputs = dict(wan_fixtures.wan_inputs(config))
    model = wan_fixtures.seeded_model(config).to(dtype)
    return model, {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _run(model: Callable[..., Any], inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(**inputs).sample
    return out


def _snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.dtype, torch.device, bool]]:
    return [(name, p.detach().clone(), p.dtype, p.device, p.requires_grad) for name, p in model.named_parameters()]


def _assert_same_parameters(model: nn.Module, before: list[tuple[str, torch.Tensor, torch.dtype, torch.device, bool]]) -> None:
    now = list(model.named_parameters())
    assert [name for name, _ in now] == [entry[0] for entry in before]
    for (name, p), (_, value, dtype, device, grad) in zip(now, before, strict=True):
        assert torch.equal(p, value), name
        assert (p.dtype, p.device, p.requires_grad) == (dtype, device, grad), name


def _fused_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_modules() if name.endswith(("to_qkv", "to_added_qkv"))}


def test_flux_fused_matches_unfused_and_runs_one_matmul_per_stream() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    assert attention.qkv_fused(model)
    double, single = model.get_submodule("transformer_blocks.0.attn"), model.get_submodule("single_transformer_blocks.0.attn")
    assert isinstance(double.get_submodule("to_qkv"), nn.Linear) and isinstance(double.get_submodule("to_added_qkv"), nn.Linear)
    assert not any(hasattr(double, name) for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"))
    assert hasattr(single, "to_qkv") and not hasattr(single, "to_added_qkv") and not hasattr(single, "to_q")
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("config", ["t2v", "i2v"])
def test_wan_self_attention_fuses_and_cross_attention_does_not(config: str) -> None:
    model, inputs = _wan(config)
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    attn1, attn2 = model.get_submodule("blocks.0.attn1"), model.get_submodule("blocks.0.attn2")
    assert hasattr(attn1, "to_qkv") and not hasattr(attn1, "to_q")
    assert hasattr(attn2, "to_q") and not hasattr(attn2, "to_qkv")  # cross-attention stays as it is
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("which", ["flux", "wan-i2v"])
def test_bf16_fused_matches_unfused(which: str) -> None:
    model, inputs = _flux(torch.bfloat16) if which == "flux" else _wan("i2v", torch.bfloat16)
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # one bf16 matmul over the concatenated weight rounds each output as three do
    torch.testing.assert_close(_run(model, inputs), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("which", ["flux", "wan"])
def test_unfuse_restores_the_parameters_bit_exactly(which: str) -> None:
    model, inputs = _flux() if which == "flux" else _wan("i2v")
    model.requires_grad_(False)
    model.get_submodule("proj_out").requires_grad_(True)
    before, keys, children = _snapshot(model), list(model.state_dict()), [n for n, _ in model.named_modules()]
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    attention.unfuse_qkv(model)
    assert not attention.qkv_fused(model) and not _fused_names(model)
    _assert_same_parameters(model, before)
    assert list(model.state_dict()) == keys and [n for n, _ in model.named_modules()] == children
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    assert len(set(storages)) == len(storages)  # each projection has storage of its own again
    assert torch.equal(_run(model, inputs), expected)


def test_fusing_keeps_no_copy_of_the_projections() -> None:
    model, _ = _flux()
    count = sum(p.numel() for p in model.parameters())
    projection = model.get_submodule("transformer_blocks.0.attn.to_q")
    assert isinstance(projection, nn.Linear)
    old = weakref.ref(projection.weight)
    del projection
    attention.fuse_qkv(model)
    gc.collect()
    assert old() is None  # the separate weight is gone, not kept beside the fused one
    assert sum(p.numel() for p in model.parameters()) == count


def test_twice_is_a_no_op_either_way() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    attention.unfuse_qkv(model)  # not fused: nothing happens
    assert not attention.qkv_fused(model) and not _fused_names(model)
    attention.fuse_qkv(model)
    fused = model.get_submodule("transformer_blocks.0.attn.to_qkv")
    attention.fuse_qkv(model)  # already fused: nothing happens
    assert model.get_submodule("transformer_blocks.0.attn.to_qkv") is fused
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    attention.unfuse_qkv(model)
    attention.unfuse_qkv(model)
    assert torch.equal(_run(model, inputs), expected)


@pytest.mark.parametrize("which", ["flux", "wan"])
def test_state_dict_while_fused_is_the_unfused_layout(which: str) -> None:
    model, _ = _flux() if which == "flux" else _wan("i2v")
    unfused = model.state_dict()
    expected = {k: v.clone() for k, v in unfused.items()}
    attention.fuse_qkv(model)
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in state.items():
        assert torch.equal(value, expected[key]) and value.dtype == expected[key].dtype, key
    path = "transformer_blocks.0.attn" if which == "flux" else "blocks.0.attn1"
    local = list(model.get_submodule(path).state_dict())  # the module's own state dict too
    assert local == [k.removeprefix(f"{path}.") for k in expected if k.startswith(f"{path}.")]


def test_save_pretrained_while_fused_writes_the_unfused_folder_and_diffusers_loads_it(tmp_path: Path) -> None:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel as DiffusersFlux

    model, inputs = _flux()
    model.save_pretrained(tmp_path / "unfused")
    attention.fuse_qkv(model)
    model.save_pretrained(tmp_path / "fused")
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "fused" / name).read_bytes() == (tmp_path / "unfused" / name).read_bytes()
    oracle = DiffusersFlux.from_pretrained(tmp_path / "fused").eval()
    with torch.no_grad():
        theirs = oracle(**inputs).sample
    torch.testing.assert_close(_run(model, inputs), theirs, atol=1e-5, rtol=1e-5)
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "fused")
    assert not attention.qkv_fused(reloaded)
    torch.testing.assert_close(_run(reloaded, inputs), _run(model, inputs), atol=1e-6, rtol=0)


def test_load_state_dict_while_fused_loads_the_unfused_layout() -> None:
    model, inputs = _flux()
    other = flux_fixtures.seeded_model(flux_fixtures.TINY, seed=3)
    expected = _run(other, inputs)
    attention.fuse_qkv(model)
    model.load_state_dict(other.state_dict())
    assert attention.qkv_fused(model)
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    attention.unfuse_qkv(model)
    for (name, mine), (_, theirs) in zip(model.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(mine, theirs), name
    attention.fuse_qkv(model)
    bad = other.state_dict()
    bad["transformer_blocks.0.attn.to_k.weight"] = bad["transformer_blocks.0.attn.to_k.weight"][:-1]
    with pytest.raises(RuntimeError, match=r"transformer_blocks\.0\.attn\.to_k\.weight"):
        model.load_state_dict(bad)  # left as three keys, which torch names


def test_diffusers_fuse_qkv_projections_gives_the_same_output() -> None:
    model, inputs = _flux()
    oracle = flux_fixtures.diffusers_flux(flux_fixtures.TINY, model.state_dict())
    oracle.fuse_qkv_projections()
    attention.fuse_qkv(model)
    with torch.no_grad():
        theirs = oracle(**inputs).sample
    torch.testing.assert_close(_run(model, inputs), theirs, atol=1e-5, rtol=1e-5)


def test_diffusers_wan_fuse_qkv_projections_gives_the_same_output() -> None:
    config = wan_fixtures.CONFIGS["t2v"]
    model, inputs = _wan("t2v")
    oracle = wan_fixtures.diffusers_wan(config, model.state_dict())
    oracle.fuse_qkv_projections()  # diffusers also fuses cross-attention's key and value
    attention.fuse_qkv(model)
    with torch.no_grad():
        theirs = oracle(**inputs).sample
    torch.testing.assert_close(_run(model, inputs), theirs, atol=1e-5, rtol=1e-5)


def test_lora_refuses_either_order_and_changes_nothing() -> None:
    model, inputs = _flux()
    add_lora(model)
    before, expected = _snapshot(model), _run(model, inputs)
    with pytest.raises(AttentionError, match="LoRA adapter.*'cp-test'.*diffcaps.lora.unload"):
        attention.fuse_qkv(model)
    assert not attention.qkv_fused(model) and not _fused_names(model)
    _assert_same_parameters(model, before)
    assert torch.equal(_run(model, inputs), expected)

    model, _ = _flux()
    source = lora_file(model)
    attention.fuse_qkv(model)
    before = _snapshot(model)
    with pytest.raises(LoRAError, match=r"QKV projections are fused.*unfuse_qkv"):
        lora.load_adapter(model, source, adapter_name="style")
    assert lora.list_adapters(model) == ()
    _assert_same_parameters(model, before)
    attention.unfuse_qkv(model)
    lora.load_adapter(model, source, adapter_name="style")  # unfused, it loads
    assert lora.list_adapters(model) == ("style",)


def test_a_model_without_fusion_gets_a_capability_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CapabilityError, match="TinyDiT does not support 'attention'"):
        attention.fuse_qkv(TinyDiT(TinyDiTConfig()))  # type: ignore[arg-type]
    assert not attention.qkv_fused(TinyDiT(TinyDiTConfig()))  # type: ignore[arg-type]
    model, _ = _flux()
    plain = AttentionSupport(modules=model.capabilities.attention.modules)
    evolved = attrs.evolve(model.capabilities, attention=plain)
    monkeypatch.setattr(FluxTransformer2DModel, "capabilities", property(lambda self: evolved))
    with pytest.raises(CapabilityError, match="does not support 'qkv_fusion"):
        attention.fuse_qkv(model)
    with pytest.raises(CapabilityError, match="qkv_fusion"):
        attention.unfuse_qkv(model)
    assert not _fused_names(model)


def test_a_projection_that_is_not_a_plain_linear_is_refused_before_anything_changes() -> None:
    class Scaled(nn.Linear):
        pass

    model, _ = _flux()
    last = model.get_submodule("single_transformer_blocks.1.attn")
    old = last.get_submodule("to_k")
    assert isinstance(old, nn.Linear)
    replacement = Scaled(old.in_features, old.out_features)
    replacement.load_state_dict(old.state_dict())
    last.register_module("to_k", replacement)
    before = _snapshot(model)
    with pytest.raises(AttentionError, match=r"single_transformer_blocks\.1\.attn\.to_k: it is a .*Scaled, not a plain"):
        attention.fuse_qkv(model)
    assert not attention.qkv_fused(model) and not _fused_names(model)  # the first blocks were not fused either
    _assert_same_parameters(model, before)


def test_mixed_requires_grad_is_refused() -> None:
    model, _ = _flux()
    model.get_submodule("transformer_blocks.1.attn.add_v_proj").requires_grad_(False)
    with pytest.raises(AttentionError, match=r"transformer_blocks\.1\.attn\.add_q_proj\+.*add_v_proj differs"):
        attention.fuse_qkv(model)
    assert not _fused_names(model)


def test_declarations_are_checked() -> None:
    with pytest.raises(ValueError, match="three attribute names"):
        QKVGroup(("to_q", "to_k"), fused="to_qk")  # type: ignore[arg-type]  # a pair, not a triple
    with pytest.raises(ValueError, match="names one attribute twice"):
        QKVGroup(("to_q", "to_q", "to_v"), fused="to_qkv")
    with pytest.raises(ValueError, match="one attribute name"):
        QKVGroup(("to_q", "to_k", "to_v"), fused="a.b")
    group = QKVGroup(("to_q", "to_k", "to_v"), fused="to_qkv")
    with pytest.raises(ValueError, match="use an attribute name twice"):
        QKVFusion(modules=ModuleTypes((nn.Linear,)), groups=(group, QKVGroup(("a", "b", "c"), fused="to_qkv")))
    with pytest.raises(ValueError, match="not among the declared attention modules"):
        AttentionSupport(modules=ModuleTypes((nn.Conv1d,)),
                         qkv_fusion=QKVFusion(modules=ModuleTypes((nn.Linear,)), groups=(group,)))


def test_metadata_rows_show_the_fused_groups() -> None:
    flux_row = FluxTransformer2DModel.metadata()["attention"].entries
    assert flux_row[-2:] == ("fuse_qkv:FluxAttention:to_q+to_k+to_v>to_qkv",
                             "fuse_qkv:FluxAttention:add_q_proj+add_k_proj+add_v_proj>to_added_qkv")
    assert WanTransformer3DModel.metadata()["attention"].entries[-1] == "fuse_qkv:WanSelfAttention:to_q+to_k+to_v>to_qkv"
    assert "fuse_qkv:WanSelfAttention" in WanTransformer3DModel.metadata().describe()


def test_backends_and_caches_run_fused() -> None:
    model, inputs = _flux()
    with attention.backend(model, "math"):
        expected = _run(model, inputs)
        attention.fuse_qkv(model)
        torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)

    def steps(m: FluxTransformer2DModel) -> tuple[list[torch.Tensor], Any]:
        cache.enable(m, cache.FirstBlockCacheConfig(threshold=0.5))
        outs = []
        for t in (0.5, 0.49, 0.48, 0.47):
            inputs["timestep"] = torch.tensor([t, t])
            with cache.context(m, "cond", timestep=t * 1000):
                outs.append(_run(m, inputs))
        stats = cache.stats(m)
        cache.disable(m)
        return outs, stats

    unfused, _ = _flux()
    want, want_stats = steps(unfused)
    got, got_stats = steps(model)
    assert got_stats == want_stats and got_stats.skipped() > 0
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_group_offloading_runs_fused_and_refuses_a_switch_while_on() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu"))
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    with pytest.raises(AttentionError, match="group offloading is enabled.*offload.disable"):
        attention.unfuse_qkv(model)
    assert attention.qkv_fused(model)
    offload.disable(model)
    attention.unfuse_qkv(model)
    offload.enable(model, GroupOffloadingConfig(onload_device="cpu"))
    with pytest.raises(AttentionError, match="group offloading is enabled"):
        attention.fuse_qkv(model)
    assert not _fused_names(model)


def test_layerwise_casting_runs_fused_and_refuses_a_switch_while_on() -> None:
    config = LayerwiseCastingConfig(storage_dtype=torch.bfloat16)
    reference, inputs = _flux()
    casting.enable(reference, config)
    expected = _run(reference, inputs)

    model, _ = _flux()
    attention.fuse_qkv(model)
    cast = casting.enable(model, config)
    assert "transformer_blocks.0.attn.to_qkv" in cast and "transformer_blocks.0.attn.to_added_qkv" in cast
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    with pytest.raises(AttentionError, match="layerwise casting is enabled.*casting.disable"):
        attention.unfuse_qkv(model)
    assert attention.qkv_fused(model)
    with pytest.raises(AttentionError, match="layerwise casting is enabled"):
        attention.fuse_qkv(reference)
    assert not _fused_names(reference)


def test_regional_compile_runs_fused() -> None:
    torch._dynamo.reset()
    model, inputs = _flux()
    expected = _run(model, inputs)
    attention.fuse_qkv(model)
    regional_compile.enable(model, RegionalCompileConfig(backend="aot_eager"))
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    regional_compile.disable(model)
    whole = torch.compile(model, backend="eager")
    attention.unfuse_qkv(whole)  # type: ignore[arg-type]  # the wrapper stands for the model inside
    assert not attention.qkv_fused(model)
    torch.testing.assert_close(_run(whole, inputs), expected, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("one_rank")
def test_context_parallelism_runs_fused() -> None:
    model, inputs = _flux()
    expected = _run(model, inputs)
    parallel.enable(model)
    attention.fuse_qkv(model)
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=0)
    parallel.disable(model)
    attention.unfuse_qkv(model)
    assert torch.equal(_run(model, inputs), expected)


def test_fuse_refuses_projections_whose_weight_torchao_quantized_and_changes_nothing() -> None:
    pytest.importorskip("torchao.quantization")
    from torchao.quantization import Int8WeightOnlyConfig

    from diffcaps import quantization

    model, inputs = _flux()
    quantization.enable(model, Int8WeightOnlyConfig())
    expected = _run(model, inputs)
    with pytest.raises(AttentionError, match=r"transformer_blocks\.0\.attn\.to_q: its weight is quantized \(Int8Tensor"):
        attention.fuse_qkv(model)
    assert not attention.qkv_fused(model) and not _fused_names(model)
    assert torch.equal(_run(model, inputs), expected)

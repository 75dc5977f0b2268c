"""Loading, scaling, unloading and calling IP-Adapters: state lives on the instance, errors are clear."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffcaps import ip_adapter
from diffcaps.errors import IPAdapterError
from diffcaps.models.flux import FluxTransformer2DModel
from diffcaps.models.flux._ip_adapter import ImagePromptAttention, ImagePromptProjections
from tests.flux_fixtures import TINY, flux_inputs, seeded_model
from tests.ip_adapter.xlabs import image_embeds, run, with_embeds, write_xlabs, xlabs_tensors


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_xlabs(tmp_path_factory.mktemp("ip") / "a.safetensors", TINY, seed=5)


def test_modules_live_on_the_instance_not_the_class(adapter_file: Path) -> None:
    model, other = seeded_model(TINY), seeded_model(TINY)
    ip_adapter.load(model, adapter_file)
    assert isinstance(model._modules["encoder_hid_proj"], ImagePromptProjections)
    assert all(isinstance(model.get_submodule(f"transformer_blocks.{i}.attn.processor"), ImagePromptAttention)
               for i in range(TINY.num_layers))
    assert not any(name.startswith("single_transformer_blocks") and "processor" in name
                   for name, _ in model.named_modules())
    assert "encoder_hid_proj" not in other._modules and not hasattr(FluxTransformer2DModel, "encoder_hid_proj")
    assert ip_adapter.adapter_names(other) == ()
    ip_names = {name for name, _ in model.named_parameters()} - {name for name, _ in other.named_parameters()}
    assert len(ip_names) == 4 + 4 * TINY.num_layers  # projection + K/V weight and bias per double block


def test_state_dict_tensors_are_copies_in_the_model_dtype(adapter_file: Path) -> None:
    tensors = xlabs_tensors(TINY, seed=5)
    model = seeded_model(TINY).to(torch.bfloat16)
    ip_adapter.load(model, tensors)
    weight = model.state_dict()["transformer_blocks.0.attn.processor.to_k_ip.0.weight"]
    assert weight.dtype == torch.bfloat16
    source = tensors["double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight"]
    assert torch.equal(weight, source.to(torch.bfloat16))
    source.zero_()  # the caller's tensors are not shared with the model
    assert weight.abs().sum() > 0
    inputs = flux_inputs(TINY, dtype=torch.bfloat16)
    assert run(model, with_embeds(inputs, [image_embeds(1)])).dtype == torch.bfloat16


def test_training_mode_follows_the_model(adapter_file: Path) -> None:
    model = seeded_model(TINY).train()
    ip_adapter.load(model, adapter_file)
    assert all(m.training for m in model.modules())
    ip_adapter.unload(model)
    model.eval()
    ip_adapter.load(model, adapter_file)
    assert not any(m.training for m in model.modules())


def test_scale_zero_gives_the_plain_model_and_2d_embeds_are_one_image(adapter_file: Path) -> None:
    model = seeded_model(TINY)
    inputs = flux_inputs(TINY, batch=2)
    plain = run(model, inputs)
    ip_adapter.load(model, adapter_file)
    embeds = image_embeds(2)
    prompted = run(model, with_embeds(inputs, [embeds]))
    assert torch.equal(run(model, with_embeds(inputs, [embeds[:, 0]])), prompted)
    ip_adapter.set_scale(model, 0.0)
    assert torch.allclose(run(model, with_embeds(inputs, [embeds])), plain, atol=1e-6)


def test_the_callers_kwargs_are_not_changed(adapter_file: Path) -> None:
    model = seeded_model(TINY)
    ip_adapter.load(model, adapter_file)
    kwargs = {"ip_adapter_image_embeds": [image_embeds(1)]}
    with torch.no_grad():
        first = model(**flux_inputs(TINY), joint_attention_kwargs=kwargs).sample
        second = model(**flux_inputs(TINY), joint_attention_kwargs=kwargs).sample
    assert list(kwargs) == ["ip_adapter_image_embeds"] and torch.equal(first, second)


def test_scale_forms() -> None:
    model = seeded_model(TINY)
    for index in range(3):
        ip_adapter.load(model, xlabs_tensors(TINY, seed=index), adapter_name=f"n{index}")
    ip_adapter.set_scale(model, 0.5)
    assert ip_adapter.get_scales(model) == {f"n{i}": (0.5, 0.5) for i in range(3)}
    ip_adapter.set_scale(model, [1, [0.1, 0.2], 0.3])
    assert ip_adapter.get_scales(model) == {"n0": (1.0, 1.0), "n1": (0.1, 0.2), "n2": (0.3, 0.3)}
    ip_adapter.set_scale(model, {"n2": [0.7, 0.8]})
    assert ip_adapter.get_scales(model) == {"n0": (1.0, 1.0), "n1": (0.1, 0.2), "n2": (0.7, 0.8)}


@pytest.mark.parametrize(("scale", "message"), [
    ([0.1, 0.2], r"3 IP-Adapters are loaded .* expected one scale per adapter \(3 entries.*got 2"),
    ([0.1, [0.2], 0.3], r"'n1': expected a number or a list of 2 per-block numbers .* got a list of 1"),
    ({"nope": 1.0}, r"no IP-Adapter named 'nope' is loaded \(loaded: 'n0', 'n1', 'n2'\)"),
    ("strong", r"expected a number, a list or a mapping"),
    (float("nan"), r"expected a finite number"),
    ([True, 0.1, 0.2], r"scale of IP-Adapter .n0.: expected a number .*got bool"),
])
def test_bad_scales_are_rejected_and_change_nothing(scale: object, message: str) -> None:
    model = seeded_model(TINY)
    for index in range(3):
        ip_adapter.load(model, xlabs_tensors(TINY, seed=index), adapter_name=f"n{index}")
    ip_adapter.set_scale(model, [0.5, 0.6, 0.7])
    with pytest.raises(IPAdapterError, match=message):
        ip_adapter.set_scale(model, scale)  # type: ignore[arg-type]
    assert ip_adapter.get_scales(model) == {"n0": (0.5, 0.5), "n1": (0.6, 0.6), "n2": (0.7, 0.7)}


def test_one_adapter_takes_a_per_block_list_of_the_model_depth(adapter_file: Path) -> None:
    model = seeded_model(TINY)
    ip_adapter.load(model, adapter_file)
    ip_adapter.set_scale(model, [0.2, 0.9])
    assert ip_adapter.get_scales(model) == {"default": (0.2, 0.9)}
    with pytest.raises(IPAdapterError, match=r"list of 2 per-block numbers .* got a list of 3"):
        ip_adapter.set_scale(model, [0.2, 0.9, 1.0])
    assert ip_adapter.get_scales(model) == {"default": (0.2, 0.9)}


def test_scale_without_adapters_and_duplicate_or_unknown_names(adapter_file: Path) -> None:
    model = seeded_model(TINY)
    with pytest.raises(IPAdapterError, match="no IP-Adapter is loaded"):
        ip_adapter.set_scale(model, 1.0)
    ip_adapter.load(model, adapter_file, adapter_name="style")
    with pytest.raises(IPAdapterError, match="'style' is already loaded"):
        ip_adapter.load(model, adapter_file, adapter_name="style")
    with pytest.raises(IPAdapterError, match=r"no IP-Adapter named 'face' is loaded \(loaded: 'style'\)"):
        ip_adapter.unload(model, "face")
    with pytest.raises(IPAdapterError, match="non-empty string"):
        ip_adapter.load(model, adapter_file, adapter_name="")
    assert ip_adapter.adapter_names(model) == ("style",)


def test_forward_needs_one_embedding_per_adapter(adapter_file: Path) -> None:
    model = seeded_model(TINY)
    ip_adapter.load(model, adapter_file, adapter_name="a")
    ip_adapter.load(model, xlabs_tensors(TINY, seed=9, embed_dim=6), adapter_name="b")
    inputs = flux_inputs(TINY)
    with pytest.raises(IPAdapterError, match=r"'a', 'b' are loaded: pass joint_attention_kwargs="):
        run(model, inputs)
    with pytest.raises(IPAdapterError, match=r"one tensor per loaded IP-Adapter \(2: 'a', 'b'\), got a list of 1"):
        run(model, with_embeds(inputs, [image_embeds(1)]))
    with pytest.raises(IPAdapterError, match=r"IP-Adapter 'b': expected a tensor \[batch, images, 6\]"):
        run(model, with_embeds(inputs, [image_embeds(1), image_embeds(1)]))
    with pytest.raises(IPAdapterError, match=r"image embeddings have batch size 2, the hidden states 1"):
        run(model, with_embeds(inputs, [image_embeds(2), image_embeds(2, 6)]))
    assert run(model, with_embeds(inputs, [image_embeds(1), image_embeds(1, 6)])).shape == (1, 16, TINY.in_channels)


def test_adapter_weights_train_and_gradient_checkpointing_gives_the_same_gradients(adapter_file: Path) -> None:
    from diffcaps import checkpointing

    model = seeded_model(TINY).train()
    ip_adapter.load(model, adapter_file)
    inputs = flux_inputs(TINY)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        model(**with_embeds(inputs, [image_embeds(1)])).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert any(".to_k_ip." in name for name in plain) and any("image_embeds" in name for name in plain)
    checkpointing.enable(model)
    try:
        checkpointed = gradients()
    finally:
        checkpointing.disable(model)
    assert checkpointed.keys() == plain.keys()
    assert all(torch.equal(checkpointed[name], plain[name]) for name in plain)

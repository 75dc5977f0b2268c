"""Each public namespace's ``__all__`` is pinned here, sorted, and matches what it actually exports.

A change to a public surface shows up in this file's diff: users call what a feature package
exports, model authors what its ``spec`` module exports, and both lists are kept small on purpose.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import diffcaps

PUBLIC_NAMES: dict[str, list[str]] = {
    "diffcaps": [
        "AutoModel",
        "Capabilities",
        "CapabilityRow",
        "Model",
        "ModelConfig",
        "ModelMetadata",
        "ModuleNames",
        "ModuleTypes",
        "__version__",
        "capability",
        "register_model",
    ],
    "diffcaps.auto": [
        "AutoModel",
        "CODE_KEY",
        "model_for_file",
    ],
    "diffcaps.attention": [
        "AttentionConfig",
        "BACKENDS",
        "BackendName",
        "active",
        "backend",
        "disable",
        "enable",
        "fuse_qkv",
        "qkv_fused",
        "unfuse_qkv",
    ],
    "diffcaps.attention.spec": [
        "AttentionSupport",
        "QKVFusion",
        "QKVGroup",
        "project_qkv",
    ],
    "diffcaps.cache": [
        "CacheConfig",
        "CacheStats",
        "FasterCacheConfig",
        "FirstBlockCacheConfig",
        "GroupStats",
        "MagCacheConfig",
        "PyramidAttentionBroadcastConfig",
        "TaylorSeerCacheConfig",
        "active",
        "calibrated_mag_ratios",
        "context",
        "disable",
        "enable",
        "interpolate_mag_ratios",
        "reset",
        "stats",
    ],
    "diffcaps.cache.spec": [
        "BlockList",
        "CacheSupport",
        "SAMPLE_FORMATS",
    ],
    "diffcaps.capabilities": [
        "Capabilities",
        "DOCS_BASE",
        "FieldInfo",
        "capability",
        "capability_fields",
    ],
    "diffcaps.casting": [
        "LayerwiseCastingConfig",
        "active",
        "disable",
        "enable",
    ],
    "diffcaps.casting.spec": [
        "CASTABLE_LAYERS",
        "GENERIC_SKIP_PATTERNS",
        "LayerwiseCasting",
        "cast_layers",
    ],
    "diffcaps.checkpointing": [
        "CheckpointingConfig",
        "active",
        "disable",
        "enable",
    ],
    "diffcaps.checkpointing.spec": [
        "GradientCheckpointing",
    ],
    "diffcaps.checks": [
        "choices",
        "flag",
        "instance",
        "integer",
        "name",
        "number",
        "patterns",
    ],
    "diffcaps.cli": [
        "ProgressBar",
        "build_parser",
        "main",
    ],
    "diffcaps.compile": [
        "RegionalCompileConfig",
        "active",
        "disable",
        "enable",
    ],
    "diffcaps.config": [
        "DIFFUSERS_COMPAT_VERSION",
        "ModelConfig",
        "at_least",
    ],
    "diffcaps.demo": [
        "DEMO_CONFIG",
        "DEMO_PROMPT",
        "WAN_DEMO_CONFIG",
        "demo_inputs",
        "pipeline_demo",
        "wan_demo_inputs",
    ],
    "diffcaps.errors": [
        "AttentionError",
        "CacheError",
        "CapabilityError",
        "CastingError",
        "CheckpointError",
        "CheckpointingError",
        "CompileError",
        "ConfigError",
        "ContextError",
        "DiffcapsError",
        "FormatError",
        "GenerateError",
        "HookError",
        "IPAdapterError",
        "InputError",
        "InteropError",
        "LoRAError",
        "MissingDependencyError",
        "ModelRegistrationError",
        "OffloadError",
        "ParallelError",
        "QuantizationError",
        "RankFailure",
        "ShapeError",
        "UnknownModelError",
        "UntrustedCodeError",
    ],
    "diffcaps.hooks": [
        "ContextualState",
        "Forward",
        "Hook",
        "Reducer",
        "SHARDING",
        "StateContext",
        "add_hook",
        "eager",
        "get_hook",
        "hook_names",
        "hooked_modules",
        "remove_hook",
        "reset_hooks",
        "sharded",
        "sum_over_shards",
        "summing_over_shards",
    ],
    "diffcaps.io": [
        "CONFIG_NAME",
        "INDEX_NAME",
        "MappedSafetensors",
        "Progress",
        "SafetensorsHeader",
        "SafetensorsReader",
        "TensorInfo",
        "TensorSlot",
        "WEIGHTS_NAME",
        "WeightSource",
        "assign_tensor",
        "expected_tensors",
        "find_weights",
        "landing_dtype",
        "load_weights",
        "on_meta_device",
        "read_config",
        "read_header",
        "resolve_model_folder",
        "save_safetensors",
        "stream_safetensors",
        "stream_shards",
        "write_weights",
    ],
    "diffcaps.ip_adapter": [
        "AdapterScale",
        "Scale",
        "Source",
        "adapter_names",
        "get_scales",
        "load",
        "set_scale",
        "unload",
    ],
    "diffcaps.ip_adapter.spec": [
        "IPAdapterSupport",
    ],
    "diffcaps.layers": [
        "AdaLayerNormContinuous",
        "AdaLayerNormZero",
        "AdaLayerNormZeroSingle",
        "AttentionKernel",
        "FP32LayerNorm",
        "FeedForward",
        "GELU",
        "RMSNorm",
        "RotaryEmbedding",
        "TextProjection",
        "TimestepEmbedding",
        "apply_rope",
        "attention",
        "attention_kernel",
        "grid_position_ids",
        "modulate",
        "modulation_table",
        "module_attention",
        "rope_frequencies",
        "set_attention_kernel",
        "table_modulation",
        "timestep_embedding",
    ],
    "diffcaps.lora": [
        "AdapterWeight",
        "LoadReport",
        "SaveLayout",
        "Source",
        "active_adapters",
        "delete_adapters",
        "disable",
        "enable",
        "enable_hotswap",
        "fuse",
        "list_adapters",
        "load_adapter",
        "lora_recogniser",
        "save_adapter",
        "set_adapters",
        "unfuse",
        "unload",
    ],
    "diffcaps.lora.spec": [
        "ADAPTER_METADATA_KEY",
        "ConvertedAdapter",
        "DIFFUSERS_PEFT",
        "DiffusersLayout",
        "InputWidening",
        "KeyFormat",
        "LORA_SUFFIXES",
        "LYCORIS_SUFFIXES",
        "LoHaWeights",
        "LoKrWeights",
        "LoRAFormat",
        "LoRALayout",
        "LoRAService",
        "LoRAWeights",
        "ModulePlacement",
        "ParamPatch",
        "Resolver",
        "TEXT_ENCODER_PREFIXES",
        "TargetWeights",
        "build_weights",
        "diffusers_peft",
        "join_lora",
        "metadata_scale",
        "model_linears",
        "module_table",
        "split_target",
        "swap_halves",
        "table_resolver",
    ],
    "diffcaps.metadata": [
        "CapabilityRow",
        "ModelMetadata",
    ],
    "diffcaps.model": [
        "CapabilitiesT",
        "ConfigT",
        "DEFAULT_MAX_SHARD_SIZE",
        "Model",
    ],
    "diffcaps.models": [
        "ENTRY_POINT_GROUP",
        "model_class",
        "model_classes",
        "model_for_class_name",
        "model_names",
        "register_model",
    ],
    "diffcaps.models.flux": [
        "FluxCapabilities",
        "FluxConfig",
        "FluxOutput",
        "FluxTransformer2DModel",
    ],
    "diffcaps.models.flux.model": [
        "FluxCapabilities",
        "FluxOutput",
        "FluxTransformer2DModel",
    ],
    "diffcaps.models.wan": [
        "WanCapabilities",
        "WanConfig",
        "WanOutput",
        "WanTransformer3DModel",
    ],
    "diffcaps.models.wan.model": [
        "WanCapabilities",
        "WanOutput",
        "WanTransformer3DModel",
    ],
    "diffcaps.offload": [
        "GroupOffloadingConfig",
        "OffloadGroup",
        "active",
        "disable",
        "enable",
        "groups",
    ],
    "diffcaps.offload.spec": [
        "GroupOffloading",
    ],
    "diffcaps.parallel": [
        "ContextParallelConfig",
        "ShardAssignment",
        "active",
        "assignment",
        "disable",
        "enable",
        "shard_sizes",
    ],
    "diffcaps.parallel.spec": [
        "ContextParallelPlan",
        "GatherOutput",
        "SplitAt",
        "SplitInput",
    ],
    "diffcaps.protocols": [
        "HasAttention",
        "HasCache",
        "HasContextParallel",
        "HasGradientCheckpointing",
        "HasGroupOffloading",
        "HasIPAdapter",
        "HasKeepInFP32",
        "HasLayerwiseCasting",
        "HasLoRA",
        "HasNoSplitModules",
        "HasQuantization",
        "HasRepeatedBlocks",
        "HasWeightMapping",
        "SupportsAttention",
        "SupportsCache",
        "SupportsContextParallel",
        "SupportsGradientCheckpointing",
        "SupportsGroupOffloading",
        "SupportsIPAdapter",
        "SupportsKeepInFP32",
        "SupportsLayerwiseCasting",
        "SupportsLoRA",
        "SupportsNoSplitModules",
        "SupportsQuantization",
        "SupportsRepeatedBlocks",
        "SupportsWeightMapping",
        "require",
        "supports_attention",
        "supports_cache",
        "supports_context_parallel",
        "supports_gradient_checkpointing",
        "supports_group_offloading",
        "supports_ip_adapter",
        "supports_keep_in_fp32",
        "supports_layerwise_casting",
        "supports_lora",
        "supports_no_split_modules",
        "supports_quantization",
        "supports_repeated_blocks",
        "supports_weight_mapping",
        "unwrap_compiled",
    ],
    "diffcaps.quantization": [
        "QuantizationReport",
        "SCHEMES",
        "Scheme",
        "active",
        "disable",
        "enable",
    ],
    "diffcaps.quantization.spec": [
        "GGUFType",
        "GGUF_TYPES",
        "PackedLinear",
        "QuantizationSupport",
        "SCALED_FP8",
        "ScaledFP8",
        "WeightCodec",
        "gguf_codec",
        "packed_linears",
        "quantized_weight",
    ],
    "diffcaps.services": [
        "ModuleNames",
        "ModuleTypes",
        "Service",
    ],
    "diffcaps.slots": [
        "InstanceSlot",
        "holding",
    ],
    "diffcaps.weights": [
        "ConversionReport",
        "FileReport",
        "Recogniser",
        "Recognition",
        "UnexpectedTensorsWarning",
        "checkpoint_recogniser",
        "convert",
        "inspect_file",
        "load_single_file",
        "save_single_file",
    ],
    "diffcaps.weights.spec": [
        "BlockCount",
        "Condition",
        "ConfigReader",
        "Const",
        "Derived",
        "Dim",
        "DimIs",
        "Has",
        "IDENTITY",
        "Identity",
        "Inverted",
        "KeyPattern",
        "Lacks",
        "Present",
        "Reorder",
        "Rule",
        "SWAP_HALVES",
        "Split",
        "TensorSpec",
        "Transform",
        "WeightMapper",
        "WeightVariant",
    ],
}


def _public_modules() -> list[str]:
    found = ["diffcaps"]
    for info in pkgutil.walk_packages(diffcaps.__path__, "diffcaps."):
        parts = info.name.split(".")[1:]
        if not any(part.startswith("_") for part in parts) and parts[0] != "interop":
            found.append(info.name)
    return sorted(found)


def test_every_public_module_is_pinned() -> None:
    assert _public_modules() == sorted(PUBLIC_NAMES)


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
def test_all_is_pinned_and_sorted(name: str) -> None:
    module = importlib.import_module(name)
    exported = list(module.__all__)
    assert exported == sorted(exported), f"{name}.__all__ is not sorted"
    assert exported == PUBLIC_NAMES[name]
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing objects: {missing}"


@pytest.mark.parametrize("name", sorted(PUBLIC_NAMES))
def test_public_names_defined_here_are_exported(name: str) -> None:
    module = importlib.import_module(name)

    def defined_here(value: object) -> bool:
        origin = getattr(value, "__module__", "") or ""
        return origin == name or origin.startswith(f"{name}._")

    public = {n for n, v in vars(module).items() if not n.startswith("_") and defined_here(v)}
    assert public <= set(module.__all__) | {"annotations"}, f"{name} exports names not in __all__"


def test_import_diffcaps_does_not_import_heavy_dependencies() -> None:
    import subprocess
    import sys

    code = "import sys, diffcaps.models.flux; print(','.join(m for m in ('peft', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_import_diffcaps_does_not_import_dynamo() -> None:
    import subprocess
    import sys

    code = "import sys, diffcaps.models.flux; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"  # torch.compile machinery costs ~1.5 s to import; features load it on use

"""``Model.metadata()``: built from the capabilities field alone; table, mapping and JSON forms."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffcaps import Capabilities, CapabilityRow, ModelMetadata
from diffcaps.capabilities import capability_fields
from diffcaps.errors import DiffcapsError
from diffcaps.models.flux import FluxCapabilities, FluxTransformer2DModel

FLUX_BLOCKS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


def test_flux_rows_come_from_its_capabilities() -> None:
    meta = FluxTransformer2DModel.metadata()
    declared = [f.name for f in attrs.fields(Capabilities)
                if getattr(FluxTransformer2DModel.declared_capabilities(), f.name) is not None]
    assert set(declared) <= set(attrs.fields_dict(FluxCapabilities))
    assert list(meta.keys()) == declared
    assert meta["no_split_modules"].entries == FLUX_BLOCKS
    assert meta["repeated_blocks"].entries == FLUX_BLOCKS
    assert "no_split_modules" in meta and "not_a_feature" not in meta
    assert [row.name for row in meta.values()] == declared
    assert dict(meta.items())["repeated_blocks"] is meta["repeated_blocks"]


def test_lookup_of_an_undeclared_or_unknown_capability_says_which() -> None:
    meta = ModelMetadata(model="Plain", rows={})
    with pytest.raises(KeyError, match="Plain does not declare 'lora'"):
        meta["lora"]
    with pytest.raises(KeyError, match="'bogus' is not a capability"):
        meta["bogus"]
    assert meta.get("lora") is None


def test_table_layout_and_no_ansi_when_not_a_tty() -> None:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        print(FluxTransformer2DModel.metadata())
    text = buffer.getvalue()
    lines = text.splitlines()
    assert lines[0] == "FluxTransformer2DModel capabilities"
    assert set(lines[1]) == {"─"} and len(lines[1]) == 72
    rows = [line for line in lines[2:] if not line.startswith("   ")]
    assert [row.split()[0] for row in rows] == list(FluxTransformer2DModel.metadata())
    assert "  no_split_modules         FluxTransformerBlock, FluxSingleTransformerBlock" in lines
    assert max(len(line) for line in lines) <= 100
    assert "\033[" not in text


def test_color_and_verbose() -> None:
    meta = FluxTransformer2DModel.metadata()
    assert "\033[1m" in meta.describe(color=True)
    verbose = meta.describe(verbose=True)
    info = capability_fields()["repeated_blocks"]
    assert info.description in verbose and info.docs in verbose
    assert info.docs.startswith("README.md#")
    assert info.description not in meta.describe()


def test_every_capability_field_has_description_and_docs_anchor_in_readme() -> None:
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    anchors = set(re.findall(r"^#+ (.+)$", readme, flags=re.M))
    slugs = {re.sub(r"[^a-z0-9 -]", "", a.lower()).replace(" ", "-") for a in anchors}
    for name, info in capability_fields().items():
        assert info.description, name
        assert info.docs.split("#", 1)[1] in slugs, f"{name}: README has no section {info.docs}"


def test_json_round_trip_of_flux_metadata() -> None:
    meta = FluxTransformer2DModel.metadata()
    payload = json.loads(json.dumps(meta.to_dict()))
    assert payload["_type"] == "diffcaps.ModelMetadata" and payload["_version"] == 1
    assert ModelMetadata.from_dict(payload) == meta


_names = st.sampled_from(sorted(capability_fields()))
_text = st.text(max_size=20)


@given(
    model=_text,
    rows=st.dictionaries(_names, st.tuples(st.lists(_text, max_size=4), _text, _text), max_size=10),
)
def test_json_round_trip_of_any_metadata(model: str, rows: dict[str, tuple[list[str], str, str]]) -> None:
    meta = ModelMetadata(
        model=model,
        rows={n: CapabilityRow(name=n, entries=e, description=d, docs=u) for n, (e, d, u) in rows.items()},
    )
    assert ModelMetadata.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"_type": "something.Else", "_version": 1, "_data": {}}, "not model metadata"),
        ({"_type": "diffcaps.ModelMetadata", "_version": 99, "_data": {}}, "version 99"),
        (
            {"_type": "diffcaps.ModelMetadata", "_version": 1,
             "_data": {"model": "M", "capabilities": {"telepathy": {"entries": [], "description": "", "docs": ""}}}},
            "unknown capability 'telepathy'",
        ),
    ],
)
def test_from_dict_refuses_foreign_payloads(payload: dict[str, object], message: str) -> None:
    with pytest.raises(DiffcapsError, match=message):
        ModelMetadata.from_dict(payload)


def test_empty_capabilities_print_a_note() -> None:
    meta = ModelMetadata.from_capabilities("Bare", Capabilities())
    assert len(meta) == 0
    assert "(no capabilities declared)" in meta.describe()

"""The shared argument checks: each refuses what its name says, with the caller's error class."""

from __future__ import annotations

import math

import pytest

from diffcaps import checks
from diffcaps.errors import CacheError, OffloadError


def test_integer_refuses_bools_floats_and_small_values() -> None:
    assert checks.integer(3, "n", OffloadError, minimum=1) == 3
    for bad in (True, 1.0, "1", None):
        with pytest.raises(OffloadError, match="n must be an integer >= 1"):
            checks.integer(bad, "n", OffloadError, minimum=1)
    with pytest.raises(OffloadError, match="n must be an integer >= 1, got 0"):
        checks.integer(0, "n", OffloadError, minimum=1)


def test_number_refuses_bools_strings_and_non_finite_values() -> None:
    assert checks.number(2, "x", CacheError) == 2.0 and isinstance(checks.number(2, "x", CacheError), float)
    for bad in (False, "0.1", math.nan, math.inf, None):
        with pytest.raises(CacheError, match="x must be a finite number"):
            checks.number(bad, "x", CacheError)
    with pytest.raises(CacheError, match=">= 0, got -1"):
        checks.number(-1, "x", CacheError, minimum=0)


def test_flag_takes_only_true_and_false() -> None:
    assert checks.flag(False, "f", CacheError) is False
    for bad in (0, 1, "false", None):
        with pytest.raises(CacheError, match="f must be True or False"):
            checks.flag(bad, "f", CacheError)


def test_instance_names_what_was_expected() -> None:
    assert checks.instance("s", str, "name", CacheError) == "s"
    with pytest.raises(CacheError, match=r"config must be a str, got 5 \(int\)"):
        checks.instance(5, str, "config", CacheError)


def test_patterns_checks_each_item_and_compiles_it() -> None:
    assert checks.patterns(["^a", "b$"], "p", CacheError) == ("^a", "b$")
    assert checks.patterns("^a", "p", CacheError, single=True) == ("^a",)
    with pytest.raises(CacheError, match="list of regular expressions, got the string"):
        checks.patterns("^a", "p", CacheError)
    with pytest.raises(CacheError, match="p entry 5 is not a string"):
        checks.patterns(["a", 5], "p", CacheError)
    with pytest.raises(CacheError, match=r"p entry '\(' is not a regular expression"):
        checks.patterns(["("], "p", CacheError)
    with pytest.raises(CacheError, match="list of regular expressions, got 3"):
        checks.patterns(3, "p", CacheError)


def test_name_is_a_non_empty_string_without_forbidden_characters() -> None:
    assert checks.name("style", "adapter_name", CacheError, forbidden=".") == "style"
    for bad in ("", 5, None, ["a"]):
        with pytest.raises(CacheError, match="adapter_name must be a non-empty string"):
            checks.name(bad, "adapter_name", CacheError, forbidden=".")
    with pytest.raises(CacheError, match=r"adapter_name must not contain '\.', got 'a\.b'"):
        checks.name("a.b", "adapter_name", CacheError, forbidden=".")


def test_choices_keeps_the_allowed_order_and_names_unknown_entries() -> None:
    allowed = ("a", "b", "c")
    assert checks.choices(["c", "a"], allowed, "letters", ValueError) == ("a", "c")
    with pytest.raises(ValueError, match=r"unknown letters \['x'\]; there are a, b, c"):
        checks.choices(("a", "x"), allowed, "letters", ValueError)
    for empty in ((), "ab", None):
        with pytest.raises(ValueError, match="non-empty tuple"):
            checks.choices(empty, allowed, "letters", ValueError)

"""Scopes: exact names and fnmatch globs, case-sensitive, and only over valid adapter names (no path tricks)."""

from __future__ import annotations

import pytest

from server.tenants.scope import Scope, check_glob

SCOPE = Scope(("acme-*", "shared-?ummary", "exact", "v[0-9].*"), base_model=False)


@pytest.mark.parametrize(
    ("name", "allowed"),
    [("acme-sql", True), ("acme-", True), ("shared-summary", True), ("shared-Summary", True), ("exact", True),
     ("v1.2", True), ("ACME-sql", False), ("Acme-sql", False), ("exact2", False), ("exac", False), ("EXACT", False),
     ("shared-ssummary", False), ("vx.1", False), ("globex-sql", False), ("acme-x/../globex", False),
     ("acme-../x", False), ("acme-/x", False), ("./acme-x", False), ("acme-x/", False), (" acme-x", False),
     ("acme-x\n", False), ("acme-x\x00", False), ("acme-" + "x" * 59, True), ("acme-" + "x" * 60, False), ("", False)],
)  # fmt: skip
def test_adapter_names(name: str, allowed: bool) -> None:
    assert SCOPE.allows_adapter(name) is allowed
    assert SCOPE.allows(name, is_base=False) is allowed


def test_acme_dotdot_is_just_a_name() -> None:
    """`acme-..` is a valid folder name inside the store, not a parent reference: it can only name itself."""
    assert SCOPE.allows_adapter("acme-..")


def test_a_star_reaches_no_path() -> None:
    everything = Scope(("*",), base_model=False)
    assert everything.allows_adapter("anything-at-all")
    for trick in ["a/b", "../x", "..", ".", ".hidden", "x/..", "/etc", "a\\b", "é"]:
        assert not everything.allows_adapter(trick)


def test_base_model_is_a_flag() -> None:
    assert not SCOPE.allows("base", is_base=True)
    assert Scope((), base_model=True).allows("base", is_base=True)
    assert not Scope((), base_model=True).allows("base", is_base=False)


@pytest.mark.parametrize("pattern", ["a/b", "../x", "a b", "", "x" * 129, "a\\b", "{a,b}", "é*"])
def test_bad_globs(pattern: str) -> None:
    with pytest.raises(ValueError, match="adapter pattern"):
        check_glob(pattern)


@pytest.mark.parametrize("pattern", ["acme-*", "a?c", "[!x]*", "exact.name_1", "*"])
def test_good_globs(pattern: str) -> None:
    assert check_glob(pattern) == pattern

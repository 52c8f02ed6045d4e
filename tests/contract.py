"""The registry contract tests' helpers: the ordered list of clauses, and the test that runs them over a registry."""
from typing import Callable, Iterable

import pytest


def clause_list() -> tuple[list[Callable], Callable]:
    """`(CLAUSES, clause)`: decorating a check with `clause` appends it to `CLAUSES`, in file order."""
    clauses: list[Callable] = []

    def clause(f: Callable) -> Callable:
        clauses.append(f)
        return f

    return clauses, clause


def contract_test(clauses: list[Callable], names: Iterable[str]) -> Callable:
    """A test of every clause on every name (the registry's entries at collection time); bind it to a
    module-level `test_*` name so that pytest collects it."""

    @pytest.mark.parametrize("name", sorted(names))
    @pytest.mark.parametrize("check", clauses, ids=[c.__name__ for c in clauses])
    def test_contract(check, name):
        check(name)

    return test_contract

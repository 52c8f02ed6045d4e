"""The registry contract tests' one helper: an ordered list of clauses and the decorator that fills it."""
from typing import Callable


def clause_list() -> tuple[list[Callable], Callable]:
    """`(CLAUSES, clause)`: decorating a check with `clause` appends it to `CLAUSES`, in file order."""
    clauses: list[Callable] = []

    def clause(f: Callable) -> Callable:
        clauses.append(f)
        return f

    return clauses, clause

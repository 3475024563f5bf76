"""Budget parents must form a forest: a cycle is refused when it is applied.

Parents (``spec.parents``) are owners, and the family tiers (own, child, sibling, cousin) are
read off the parent graph.  SPEC §family notes that the reference never checked that graph for
cycles, so ``a``'s parent ``b`` with ``b``'s parent ``a`` was accepted and the two then shared
with each other as each other's children (issue 19).  We refuse the Budget that would close a
cycle, naming it the way a reader follows it: ``org:a -> org:b -> org:a``.

Only cycles through an owner of the applied Budgets are refused, so a ledger written before
this rule (which may hold a cycle) does not block unrelated applies.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable, Sequence

from gpu_fleet.core.model import Budget


def parent_cycle(
    existing: Iterable[Budget], applied: Sequence[Budget]
) -> tuple[Budget, str] | None:
    """The first applied Budget that closes a parent cycle, with the cycle; None if none does.

    ``applied`` are taken in order, each on top of ``existing`` and the ones before it
    (replacing a Budget with the same key), so the Budget named is the one that closes the
    cycle as a reader of the file would apply it.  The cycle is the shortest one through its
    owner, walked from it, with ties broken by owner name, so the message is stable.
    """
    budgets = {b.key: b for b in existing}
    for b in applied:
        budgets[b.key] = b
        parents: dict[str, set[str]] = defaultdict(set)
        for other in budgets.values():
            parents[other.spec.owner].update(other.spec.parents)
        path = _shortest_path_back(parents, b.spec.owner)
        if path is not None:
            return b, " -> ".join(path)
    return None


def _shortest_path_back(parents: dict[str, set[str]], owner: str) -> list[str] | None:
    """Breadth-first from ``owner`` along parent edges until it comes back to ``owner``."""
    came_from: dict[str, str] = {}
    queue = deque([owner])
    seen = {owner}
    while queue:
        node = queue.popleft()
        for parent in sorted(parents.get(node, ())):
            if parent == owner:
                path = [owner]
                step = node
                while step != owner:
                    path.append(step)
                    step = came_from[step]
                return [owner, *reversed(path[1:]), owner]
            if parent not in seen:
                seen.add(parent)
                came_from[parent] = node
                queue.append(parent)
    return None

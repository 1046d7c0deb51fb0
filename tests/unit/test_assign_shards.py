"""assign_shards, property-based: every shard owned exactly once, loads balanced, and sticky (a member keeps its
shards unless balance requires moving them)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dsched.coordinator.service import assign_shards

members_st = st.lists(st.sampled_from([f"p{i}" for i in range(12)]), min_size=1, max_size=12, unique=True)


@st.composite
def situations(draw: st.DrawFn) -> tuple[int, list[str], dict[str, list[int]]]:
    """A shard count, the live members, and a previous assignment (possibly of other, departed members)."""
    shard_count = draw(st.integers(min_value=1, max_value=64))
    members = draw(members_st)
    previous_owners = draw(members_st)
    current: dict[str, list[int]] = {}
    for shard in range(shard_count):
        if draw(st.booleans()):
            current.setdefault(draw(st.sampled_from(previous_owners)), []).append(shard)
    return shard_count, members, current


@settings(max_examples=150, deadline=None, derandomize=True)
@given(situations())
def test_every_shard_is_owned_exactly_once_by_a_live_member(
    situation: tuple[int, list[str], dict[str, list[int]]],
) -> None:
    shard_count, members, current = situation
    target = assign_shards(shard_count, members, current)
    owned = sorted(shard for shards in target.values() for shard in shards)
    assert owned == list(range(shard_count))
    assert set(target) <= set(members)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(situations())
def test_loads_differ_by_at_most_one(situation: tuple[int, list[str], dict[str, list[int]]]) -> None:
    shard_count, members, current = situation
    target = assign_shards(shard_count, members, current)
    loads = [len(target.get(member, [])) for member in members]
    assert max(loads) - min(loads) <= 1


@settings(max_examples=150, deadline=None, derandomize=True)
@given(situations())
def test_sticky_a_balanced_assignment_is_kept_and_moves_are_minimal(
    situation: tuple[int, list[str], dict[str, list[int]]],
) -> None:
    shard_count, members, current = situation
    target = assign_shards(shard_count, members, current)
    assert assign_shards(shard_count, members, target) == target  # applying it again changes nothing
    # A live member keeps at least as many of its shards as its new share allows.
    base = shard_count // len(members)
    for member in members:
        kept = set(current.get(member, [])) & set(target.get(member, []))
        valid_before = {s for s in current.get(member, []) if 0 <= s < shard_count}
        assert len(kept) >= min(len(valid_before), base)

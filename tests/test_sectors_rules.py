"""The sans-IO rules of the sector-location service: freshness, the last known location, the
background refresh plan, eviction, and the time a batch may take."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from damocles_ext.sectors import Bounds, SectorAnswer, SectorLocation, SectorRef
from damocles_ext.sectors.cache import CacheRules, SectorCache
from damocles_ext.sectors.model import provider_slice

S1, S2, S3 = (SectorRef(1000, n) for n in (1, 2, 3))
HERE = SectorLocation("/a/sealed/s-t01000-1", "/a/cache/s-t01000-1", "a", "a")


def cache(**rules):
    return SectorCache(CacheRules(**{"fresh_for": 100, "refresh_lead": 20, **rules}))


def test_an_entry_is_fresh_until_fresh_for_and_a_last_known_location_until_keep_for():
    c = cache(keep_for=1000)
    c.learn(S1, HERE, "source", now=0)
    assert c.fresh(S1, 99.9) is not None and c.fresh(S1, 100) is None
    assert c.last_known(S1, 999).location == HERE
    assert c.last_known(S1, 1000) is None and S1 not in c  # too old: dropped


def test_forget_drops_the_entry_and_its_want_so_an_unknown_sector_is_not_refreshed_again():
    c = cache()
    c.learn(S1, HERE, "source", now=0)
    c.want([S1], at=1000)
    c.forget(S1)
    assert c.get(S1) is None and len(c) == 0
    assert c.wanted == 0 and c.due(990) == [] and c.next_wakeup(990) is None


def test_a_wanted_sector_is_due_refresh_lead_before_it_is_needed_unless_fresh_then():
    c = cache()
    c.want([S1, S2], at=1000)
    c.learn(S2, HERE, "source", now=950)  # fresh at 1000 already: nothing to do for it
    assert c.next_wakeup(0) == 980
    assert c.due(979) == [] and c.due(980) == [S1]
    c.learn(S1, HERE, "source", now=980)
    assert c.due(981) == [] and c.wanted == 0


def test_a_want_whose_time_passed_is_dropped():
    c = cache()
    c.want([S1], at=100)
    assert c.due(101) == [] and c.wanted == 0 and c.next_wakeup(101) is None


def test_a_used_entry_is_refreshed_ahead_of_going_stale_while_it_is_still_used():
    c = cache(refresh_ahead=0.8)
    c.learn(S1, HERE, "source", now=0)
    assert c.next_wakeup(0) is None  # never used: no refresh
    c.fresh(S1, 10)
    assert c.next_wakeup(10) == 80 and c.due(80) == [S1]
    c.learn(S1, HERE, "source", now=80)
    # Last used at 10: by 160 it has not been used for 150 s, over fresh_for: it cools down.
    assert c.next_wakeup(80) is None


def test_a_refresh_without_answer_waits_retry_after():
    c = cache(retry_after=30)
    c.want([S1], at=1000)
    c.tried([S1], now=980)
    assert c.due(990) == [] and c.next_wakeup(990) == 1010


def test_a_failed_refresh_of_a_want_that_passed_leaves_nothing_behind():
    # Each want whose refresh got no answer (its source down) left the try's time for ever.
    c = cache(retry_after=30)
    for n in range(1, 2001):
        sector = SectorRef(1000, n)
        c.want([sector], at=n + 1000)
        assert c.due(n + 980) == [sector]
        c.tried([sector], now=n + 980)
    assert c.due(10_000) == [] and c.wanted == 0
    assert len(c._tried) == len(c._planned) == len(c._entries) == 0


def test_a_refresh_ahead_without_answer_is_retried_only_while_the_sector_is_still_used():
    # It was retried every retry_after for as long as the entry was kept (a week): a sector
    # looked up once, with its source down, was asked again and again though nobody used it.
    c = cache(refresh_ahead=0.8, retry_after=15)
    c.learn(S1, HERE, "source", now=0)
    c.fresh(S1, 10)  # used at 10: hot until 110
    assert c.due(80) == [S1]
    c.tried([S1], now=80)
    assert c.next_wakeup(80) == 95 and c.due(95) == [S1]
    c.tried([S1], now=95)  # the next retry, at 110, is past its last use's fresh_for
    assert c.next_wakeup(95) is None and c.due(10_000) == []
    c.last_known(S1, 10_001)  # used again (the providers failed, its last location given)
    assert c.due(10_001) == [S1]


def test_the_least_recently_used_entry_goes_first_past_max_entries():
    c = cache(max_entries=2)
    c.learn(S1, HERE, "p", now=0)
    c.learn(S2, HERE, "p", now=0)
    c.fresh(S1, 1)  # S1 used: S2 is now the least recently used
    c.learn(S3, HERE, "p", now=2)
    assert S1 in c and S3 in c and S2 not in c


class Counting(SectorCache):
    """Counts how many times a sector's refresh time is worked out: the plan's cost."""

    examined = 0

    def _due_at(self, sector):
        self.examined += 1
        return super()._due_at(sector)


@pytest.mark.parametrize("hot", [1_000, 10_000])
def test_planning_the_refresh_after_a_lookup_costs_the_same_whatever_the_cache_holds(hot):
    c = Counting(CacheRules(fresh_for=100, refresh_lead=20))
    sectors = [SectorRef(1000, n) for n in range(hot)]
    for sector in sectors:
        c.learn(sector, HERE, "source", now=0)
        c.fresh(sector, 1)  # looked up: hot, refreshed ahead at 80
    c.examined = 0
    # What the background refresh does after each lookup: plan again, then sleep until due.
    for n, sector in enumerate(sectors[:100]):
        c.fresh(sector, 2 + n / 100)
        assert c.due(2 + n / 100) == [] and c.next_wakeup(2 + n / 100) == 80
    assert c.examined <= 100  # the sectors looked up, not every hot one
    assert c.due(80) == sectors  # all still planned


class BruteForce(SectorCache):
    """The plan worked out from every entry each time: the rules written out plainly."""

    def due(self, now):
        for sector, wanted in list(self._wanted.items()):
            if wanted < now:
                del self._wanted[sector]
        due = [(s, self._when(s)) for s in sorted(self._candidates())]
        return [s for s, when in due if when is not None and when <= now]

    def next_wakeup(self, now):
        times = [t for t in map(self._when, self._candidates()) if t is not None]
        return min(times, default=None)

    def _candidates(self):
        return set(self._wanted) | {s for s, e in self._entries.items() if e.used_at is not None}

    def _when(self, sector):
        return self._due_at(sector)


operation = st.tuples(
    st.sampled_from(["learn", "fresh", "last_known", "forget", "want", "tried", "due"]),
    st.integers(0, 5),  # the sector
    st.integers(0, 60),  # time passing
    st.integers(0, 300),  # a want's distance
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=60), st.integers(2, 7))
def test_the_kept_plan_says_what_working_it_out_from_every_entry_says(operations, max_entries):
    rules = CacheRules(fresh_for=100, keep_for=250, refresh_lead=20, max_entries=max_entries)
    kept, plain = SectorCache(rules), BruteForce(rules)
    now = 0
    for what, number, later, distance in operations:
        now += later
        sector = SectorRef(1000, number)
        for c in (kept, plain):
            if what == "learn":
                c.learn(sector, HERE, "p", now)
            elif what in ("fresh", "last_known"):
                getattr(c, what)(sector, now)
            elif what == "forget":
                c.forget(sector)
            elif what == "want":
                c.want([sector], at=now + distance)
            elif what == "tried":
                c.tried([sector], now)
        assert kept.due(now) == plain.due(now)
        assert kept.next_wakeup(now) == plain.next_wakeup(now)
        assert kept.wanted == plain.wanted and len(kept) == len(plain)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"fresh_for": -1}, "fresh_for must be"),
        ({"keep_for": 10}, "keep_for"),
        ({"refresh_lead": 100}, "refresh_lead"),
        ({"refresh_ahead": 0}, "refresh_ahead"),
        ({"max_entries": 0}, "max_entries"),
    ],
)
def test_rules_that_cannot_work_are_refused_with_the_reason(rules, message):
    with pytest.raises(ValueError, match=message):
        CacheRules(**{"fresh_for": 100, "refresh_lead": 20, **rules})


def test_a_batch_takes_a_share_of_the_time_left_capped_and_keeps_a_reserve_for_checks():
    b = Bounds(batch_timeout=60, deadline_share=0.25, check_timeout=2)
    assert b.budget(None) == 60 and b.budget(1000) == 60 and b.budget(20) == 5
    assert b.budget(-5) == 0
    assert b.phases(100, 5) == (100 + 5 - 1.25, 105)
    assert b.phases(100, 60) == (158, 160)


def test_each_provider_gets_an_equal_share_of_what_is_left():
    assert provider_slice(0, 12, 3) == 4 and provider_slice(4, 12, 2) == 8
    assert provider_slice(10, 12, 1) == 12 and provider_slice(13, 12, 1) == 13


@pytest.mark.parametrize(("miner", "number"), [(-1, 1), (1, -1), (2**64, 1), (True, 1), (1, "2")])
def test_a_sector_ref_refuses_what_is_not_a_sector(miner, number):
    with pytest.raises(ValueError, match="whole number"):
        SectorRef(miner, number)


def test_an_answer_says_itself_as_json_ready_data():
    answer = SectorAnswer(S1, "found", HERE, "source x", True, 12.34567, "source down")
    assert answer.stale and answer.to_dict() == {
        "miner": 1000, "number": 1, "upgrade": False, "status": "found",
        "sealed_file": HERE.sealed_file, "cache_dir": HERE.cache_dir, "sealed_store": "a",
        "cache_store": "a", "provider": "source x", "cached": True, "age": 12.346,
        "detail": "source down",
    }  # fmt: skip
    assert str(SectorRef(7, 9, upgrade=True)) == "sector 9 of miner 7 (upgraded)"


def test_a_restore_forgotten_past_what_the_cache_holds_takes_nothing_in_and_notes_no_more():
    # A snapshot read that never ends: the sectors forgotten meanwhile were noted for ever.
    from damocles_ext.sectors.cache import CacheEntry

    c = cache(max_entries=3)
    c.begin_restore()
    for number in range(10):
        c.forget(SectorRef(1000, number))
    assert len(c._forgotten or ()) <= 3
    late = {SectorRef(1000, 99): CacheEntry(HERE, "source", 0.0)}
    assert c.take_restored(late) == 0 and len(c) == 0  # which were forgotten is not known
    c.begin_restore()  # a next restore notes again
    c.forget(SectorRef(1000, 1))
    assert c.take_restored({SectorRef(1000, 99): CacheEntry(HERE, "source", 0.0)}) == 1

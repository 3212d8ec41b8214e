"""Pure helpers of reading the log (progress in broker entries) and of the rebuild's writes
(which server gets secondary indexes, how a write is cut into calls)."""

from __future__ import annotations

from eventdispatch.admin import entries_through
from eventdispatch.bus import count_entries, reached, within
from projections.store import uses_secondary_indexes, write_chunks


def test_entries_are_counted_once_across_batches() -> None:
    # entry (5, 0) is a batch of three messages; (5, 1) a single one; (6, 0) a batch of two
    first = [(5, 0, 0), (5, 0, 1)]
    second = [(5, 0, 2), (5, 1, -1), (6, 0, 0)]
    third = [(6, 0, 1)]
    n1, last = count_entries(first, None)
    n2, last = count_entries(second, last)
    n3, last = count_entries(third, last)
    assert (n1, n2, n3) == (1, 2, 0)
    assert last == (6, 0)
    assert count_entries([], (6, 0)) == (0, (6, 0))


def test_entries_through_an_end_span_the_retained_ledgers() -> None:
    ledgers = [
        {"ledgerId": 10, "entries": 500},
        {"ledgerId": 12, "entries": 300},
        {"ledgerId": 15, "entries": 0},  # the open ledger: its entries are not listed yet
    ]
    assert entries_through(ledgers, (15, 41)) == 500 + 300 + 42
    assert entries_through(ledgers, (12, 299)) == 500 + 300
    assert entries_through(ledgers, (10, 0)) == 1
    assert entries_through(ledgers, (11, 3)) is None  # not a ledger of this topic
    assert entries_through([], (1, 0)) is None


def test_secondary_indexes_only_where_the_server_uses_them() -> None:
    mongod = {"version": "7.0.14", "ok": 1.0}
    ferret = {"version": "7.0.42", "ferretdbVersion": "v1.24.2", "ok": 1.0}
    sqlite_plan = {
        "queryPlanner": {"Plan": ["id=2 parent=0 notused=0 detail=SCAN projection_meta_bca9c8b0"]},
        "filterPushdown": False,
    }
    assert uses_secondary_indexes(mongod, {})
    assert not uses_secondary_indexes(ferret, sqlite_plan)
    assert not uses_secondary_indexes(ferret, {"queryPlanner": {}, "filterPushdown": False})
    assert uses_secondary_indexes(ferret, {"queryPlanner": {"Plan": {}}, "filterPushdown": True})


def test_a_write_is_cut_into_chunks_of_each_model_and_kind() -> None:
    docs = [{"_id": str(i)} for i in range(5)]
    taken = {"executions": (docs, docs[:1]), "devices": ([], docs[:2])}
    calls = list(write_chunks(taken, 2))
    assert [(m, r, len(d)) for m, r, d in calls] == [
        ("executions", False, 2),
        ("executions", False, 2),
        ("executions", False, 1),
        ("executions", True, 1),
        ("devices", True, 2),
    ]
    assert [d for m, r, d in calls if m == "executions" and not r] == [
        docs[:2],
        docs[2:4],
        docs[4:],
    ]


def test_a_read_through_the_last_message_takes_its_whole_batch() -> None:
    end = (7, 3, 2)  # the last entry is a batch of three messages
    batch = [(7, 2, -1), (7, 3, 0), (7, 3, 1), (7, 3, 2)]
    assert [within(p, end) for p in batch] == [True] * 4
    assert [reached(p, end) for p in batch] == [False, False, False, True]
    assert not within((7, 4, 0), end) and reached((7, 4, 0), end)
    assert not within((8, 0, -1), end)


def test_an_end_without_a_batch_index_covers_its_whole_entry() -> None:
    end = (7, 3, -1)
    assert within((7, 3, 0), end) and within((7, 3, 5), end) and within((7, 3, -1), end)
    assert reached((7, 3, 0), end)
    assert not reached((7, 2, 9), end)

"""The rebuild's in-memory fold (projections.rebuild.Fold): whatever the window and however
many documents leave memory and are read back, the documents written equal the reducers' fold
of the whole log, and a document changing all along is written once."""

from __future__ import annotations

from eventdispatch import events as ev
from eventdispatch.events import Event
from projections.rebuild import Fold
from projections.reducers import MODELS, Doc, fold

TASKS = 6
DEVICES = 5


def execution_events() -> list[Event]:
    """Each task runs on every device: Created, Locked, Sent, then Retrying and a second
    attempt for odd devices, Succeeded; with a republished (duplicate) event now and then."""
    out: list[Event] = []
    seq = dict.fromkeys(range(DEVICES), 0)
    for t in range(TASKS):
        task = f"task-{t}"
        out.append(
            Event(
                event_id=f"task:{task}:accepted",
                occurred_at_ms=t * 1000,
                seq=0,
                device_id=None,
                task_id=task,
                attempt=None,
                payload=ev.TaskAccepted(
                    command_id=f"cmd-{t}",
                    script_id="s",
                    script_version=1,
                    devices=tuple(f"dev-{d}" for d in range(DEVICES)),
                    execute_at_ms=None,
                    max_attempts=3,
                    timeout_s=60,
                    priority=0,
                    params_json="{}",
                    fingerprint="fp",
                ),
            )
        )
        for d in range(DEVICES):
            attempts = 2 if d % 2 else 1
            created = ev.Created(
                script_id="s",
                script_version=1,
                execute_at_ms=None,
                max_attempts=3,
                timeout_s=60,
                priority=0,
            )
            payloads: list[tuple[int, ev.Payload]] = [(0, created)]
            for a in range(1, attempts + 1):
                payloads += [(a, ev.Locked()), (a, ev.Sent(deadline_ms=t * 1000 + 60_000))]
                if a < attempts:
                    payloads += [(a, ev.Retrying(error="boom", retry_at_ms=t * 1000 + 5))]
            payloads.append((attempts, ev.Succeeded(message="ok")))
            for attempt, payload in payloads:
                seq[d] += 1
                event = Event(
                    event_id=f"dev-{d}:{seq[d]}",
                    occurred_at_ms=t * 1000 + seq[d],
                    seq=seq[d],
                    device_id=f"dev-{d}",
                    task_id=task,
                    attempt=attempt or None,
                    payload=payload,
                )
                out.append(event)
                if seq[d] % 7 == 0:
                    out.append(event)  # a duplicate changes nothing
    return out


def run(fold_: Fold, log: list[Event], step: int) -> tuple[dict[str, dict[str, Doc]], int]:
    """Feed `log` in batches of `step` as the rebuild does, writing into a dict 'store' that
    checks inserts are new and replacements are not. Returns the store and the number of
    read-backs."""
    store: dict[str, dict[str, Doc]] = {m.name: {} for m in MODELS}
    read_backs = 0

    def write(taken: dict[str, tuple[list[Doc], list[Doc]]]) -> None:
        for model, (inserts, replaces) in taken.items():
            for doc in inserts:
                assert doc["_id"] not in store[model], f"{model} {doc['_id']} inserted twice"
                store[model][doc["_id"]] = doc
            for doc in replaces:
                assert doc["_id"] in store[model], f"{model} {doc['_id']} replaced, never inserted"
                store[model][doc["_id"]] = doc

    for start in range(0, len(log), step):
        fold_.add(log[start : start + step])
        for model, keys in fold_.blocked_keys().items():
            read_backs += len(keys)
            fold_.load(model, [store[model][k] for k in keys if k in store[model]])
        if fold_.full:
            write(fold_.take())
    write(fold_.take(everything=True))
    return store, read_backs


def test_fold_equals_the_reducers_fold_whatever_the_window() -> None:
    log = execution_events()
    expected = fold(log)
    for window, keep, step in [(10_000, 10_000, 50), (4, 2, 3), (1, 0, 1), (7, 1, 11)]:
        store, _ = run(Fold(MODELS, window=window, keep=keep), log, step)
        assert store == expected, (window, keep, step)


def test_small_memory_reads_documents_back() -> None:
    log = execution_events()
    fold_ = Fold(MODELS, window=2, keep=0)
    store, read_backs = run(fold_, log, 4)
    assert read_backs > 0
    assert store == fold(log)
    assert fold_.count["devices"] > DEVICES  # devices written again after leaving memory


def test_large_window_writes_each_document_once() -> None:
    log = execution_events()
    fold_ = Fold(MODELS, window=10_000, keep=10_000)
    store, read_backs = run(fold_, log, 10)
    assert read_backs == 0
    assert fold_.count == {name: len(docs) for name, docs in store.items()}
    assert fold_.count["devices"] == DEVICES
    assert fold_.count["executions"] == TASKS * DEVICES


def test_a_hot_document_stays_in_memory_while_cold_ones_are_handed_over() -> None:
    log = execution_events()
    fold_ = Fold([m for m in MODELS if m.name in ("executions", "devices")], window=4 * DEVICES)
    written: dict[str, int] = {"executions": 0, "devices": 0}
    for start in range(0, len(log), 5):
        fold_.add(log[start : start + 5])
        if fold_.full:
            for model, (inserts, replaces) in fold_.take().items():
                written[model] += len(inserts) + len(replaces)
    assert written["executions"] > 0  # finished executions left memory
    assert written["devices"] == 0  # every device is touched by every task: still in memory

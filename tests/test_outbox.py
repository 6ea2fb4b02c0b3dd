"""The persistent outbox: several daemons sharing one store deliver each message once."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import create_engine, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from bridge.outbox import OutboxItem, OutboxWorker
from bridge.runtime import Runtime
from bridge.store.models import AuditEntry, OutboxMessage, Patient
from bridge.store.types import utcnow
from tests.conftest import pms_bridge_command
from tests.support.cancellation import assert_ends_when_cancelled_as_woken


async def test_two_daemons_on_one_store_deliver_each_message_once(runtime: Runtime) -> None:
    now = utcnow()

    def seed(session: object) -> None:
        patient = Patient(
            last_name="X", first_name="Y", name_key="x y", sex="U", created_at=now, updated_at=now
        )
        session.add(patient)  # type: ignore[attr-defined]
        session.flush()  # type: ignore[attr-defined]
        for n in range(60):
            session.add(  # type: ignore[attr-defined]
                OutboxMessage(
                    channel="test",
                    key=f"k{n}",
                    patient_id=patient.id,
                    payload={},
                    next_attempt_at=now,
                    created_at=now,
                )
            )

    await runtime.db.write(seed)
    other = Runtime.build(runtime.settings, migrate=False)
    delivered: list[int] = []

    async def sender(_rt: Runtime, item: OutboxItem) -> None:
        await asyncio.sleep(0.001)
        delivered.append(item.id)

    try:
        workers = [OutboxWorker(rt, "test", sender) for rt in (runtime, other)]
        for _ in range(5):
            await asyncio.gather(*(w.run_once() for w in workers), *(w.run_once() for w in workers))
        assert sorted(delivered) == sorted(set(delivered)) and len(delivered) == 60
    finally:
        other.close()


async def test_a_worker_cancelled_as_it_is_woken_ends(runtime: Runtime) -> None:
    """A daemon's stop cancels its outbox workers and waits for them. One woken (an image added) in the
    same turn of the event loop as the stop's cancellation ran on, its waits ignoring the cancellation
    (Python 3.11's wait_for), and the daemon never ended: CI saw one hang at SIGTERM."""

    async def sender(_rt: Runtime, _item: OutboxItem) -> None:
        raise AssertionError("nothing is due")

    def start() -> tuple[Any, asyncio.Event]:
        worker = OutboxWorker(runtime, "test", sender, poll_seconds=60)
        return worker.run(), worker.wake

    await assert_ends_when_cancelled_as_woken(start)


# --------------------------------------------------------------------------------------------------
# Claims and leases: a daemon settles only its own messages and those of a daemon that died


@contextlib.contextmanager
def two_daemons(settings: Any) -> Iterator[tuple[Runtime, Runtime]]:
    """The runtimes of two daemons on one store (scale-out): the first migrates it, the second finds it
    migrated; both closed at the end, the second first."""
    a = Runtime.build(settings)
    try:
        b = Runtime.build(settings, migrate=False)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


async def seed_messages(rt: Runtime, count: int, *, channel: str = "test", state: str = "pending") -> None:
    """`count` messages of one patient in `state` (failed ones after 50 attempts, with their error)."""
    now = utcnow()
    failed = state == "failed"

    def seed(session: Session) -> None:
        patient = Patient(
            last_name="X", first_name="Y", name_key="x y", sex="U", created_at=now, updated_at=now
        )
        session.add(patient)
        session.flush()
        for n in range(count):
            session.add(
                OutboxMessage(
                    channel=channel,
                    key=f"{channel}-{state}-{n}",
                    patient_id=patient.id,
                    payload={},
                    state=state,
                    attempts=50 if failed else 0,
                    last_error="the thumbnail folder is not reachable" if failed else "",
                    next_attempt_at=now,
                    created_at=now,
                )
            )

    await rt.db.write(seed)


Row = tuple[str, str | None, datetime | None, int]


def rows(rt: Runtime) -> list[Row]:
    """Each message's state, claimer, lease and attempts, in id order."""

    def read(session: Session) -> list[Row]:
        found = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id))
        return [(m.state, m.claimed_by, m.lease_until, m.attempts) for m in found]

    return rt.db.read_sync(read)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(1200):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


class BlockingSender:
    """A sender that takes its time until released: a PMS's import program at work (`fails`: and then
    reports that the push did not arrive)."""

    def __init__(self, *, fails: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.sent: list[int] = []
        self.fails = fails

    async def __call__(self, _rt: Runtime, item: OutboxItem) -> None:
        self.started.set()
        await self.release.wait()
        if self.fails:
            raise RuntimeError("no READY=1")
        self.sent.append(item.id)


async def test_a_starting_daemon_leaves_a_running_daemons_push_alone(make_settings: Any) -> None:
    """Daemon A is sending (its PMS takes longer than the lease); daemon B starts on the same store. B's
    look for cut-off messages must not take A's: A renews its lease while it sends. Before claims were
    recorded, B reset A's message and the PMS got the push twice."""
    settings = make_settings(daemon={"outbox_lease": 1})
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 1)
        sender = BlockingSender()
        sending = asyncio.create_task(OutboxWorker(a, "test", sender).run_once())
        await sender.started.wait()
        [(state, claimer, first_lease, _attempts)] = rows(a)
        assert (state, claimer) == ("sending", a.instance_id) and first_lease is not None
        await until(lambda: utcnow() > first_lease, "the first lease to have run out")
        await until(lambda: (rows(a)[0][2] or first_lease) > first_lease, "A to renew its lease")
        other = OutboxWorker(b, "test", sender)
        assert await other.recover() == 0
        assert await other.run_once() == 0
        assert rows(a)[0][:2] == ("sending", a.instance_id)
        sender.release.set()
        assert await sending == 1
        assert [r[0] for r in rows(a)] == ["done"] and len(sender.sent) == 1


async def test_a_claim_that_ran_out_is_taken_over_and_only_its_new_holder_settles_it(
    make_settings: Any,
) -> None:
    """A daemon that stalls past its lease (a paused VM; here its lease is ended under it) loses the
    message to a running one, whose recover hook settles it; the stalled one, carrying on (its program
    saw no READY=1 in time), does not overwrite that with a retry: the PMS would get the push twice."""
    settings = make_settings(daemon={"outbox_lease": 3600})  # A would renew only after 20 minutes
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 1)
        sender = BlockingSender(fails=True)
        stalled = asyncio.create_task(OutboxWorker(a, "test", sender).run_once())
        await sender.started.wait()

        def expire(session: Session) -> None:
            session.execute(update(OutboxMessage).values(lease_until=utcnow() - timedelta(seconds=1)))

        await a.db.write(expire, watched=False)
        asked: list[int] = []

        async def recover(_rt: Runtime, item: OutboxItem) -> bool:
            asked.append(item.id)
            return True  # the PMS has it (A's program delivered it)

        assert await OutboxWorker(b, "test", BlockingSender(), recover=recover).recover() == 1
        assert rows(a)[0][:2] == ("done", b.instance_id)
        sender.release.set()
        assert await stalled == 1
        assert rows(a)[0][:2] == ("done", b.instance_id) and len(asked) == 1


async def test_a_message_sending_from_before_claims_were_recorded_is_settled(runtime: Runtime) -> None:
    """A row left in "sending" by a daemon of an older version (no claimer, no lease) counts as cut off."""
    await seed_messages(runtime, 1, state="sending")
    worker = OutboxWorker(runtime, "test", BlockingSender())
    assert await worker.recover() == 1
    assert rows(runtime)[0][:2] == ("pending", runtime.instance_id)


# --------------------------------------------------------------------------------------------------
# What the admin sees: metrics, doctor, pms-bridge outbox list | retry


async def test_metrics_show_the_outbox_by_channel_and_state(api_client: Any, runtime: Runtime) -> None:
    await seed_messages(runtime, 2, channel="vdds-push", state="failed")
    await seed_messages(runtime, 1, channel="dentrix-thumbnails", state="pending")
    response = await api_client.get("/metrics")
    assert response.status == 200
    text = await response.text()
    assert 'pms_bridge_outbox_messages{channel="vdds-push",state="failed"} 2.0' in text
    assert 'pms_bridge_outbox_messages{channel="vdds-push",state="pending"} 0.0' in text  # a channel it runs
    assert 'pms_bridge_outbox_messages{channel="dentrix-thumbnails",state="pending"} 1.0' in text
    assert 'pms_bridge_outbox_oldest_age_seconds{channel="dentrix-thumbnails",state="pending"}' in text
    ready = await api_client.get("/readyz")
    assert ready.status == 200  # the daemon still serves every PMS: a failed push is no readiness matter


def pms_bridge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*pms_bridge_command(), *args], capture_output=True, text=True, timeout=120)


async def test_doctor_warns_of_failed_pushes_and_retry_makes_them_pending(runtime: Runtime) -> None:
    config = str(runtime.settings.path)
    await seed_messages(runtime, 2, channel="vdds-push", state="failed")
    await seed_messages(runtime, 1, channel="dentrix-thumbnails", state="failed")

    doctor = await asyncio.to_thread(pms_bridge, "doctor", "--config", config)
    (line,) = [line for line in doctor.stdout.splitlines() if "(outbox)" in line]
    assert line.startswith("WARN pushes to PMSs (outbox): 1 dentrix-thumbnails, 2 vdds-push messages failed")
    assert "pms-bridge outbox retry" in line

    listed = await asyncio.to_thread(pms_bridge, "outbox", "list", "--config", config)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:3] == ["vdds-push", "failed", "2"] for line in listed.stdout.splitlines())
    assert "the thumbnail folder is not reachable" in listed.stdout

    retried = await asyncio.to_thread(
        pms_bridge, "outbox", "retry", "--channel", "vdds-push", "--config", config
    )
    assert retried.returncode == 0, retried.stderr
    assert "2 failed messages of vdds-push are pending again" in retried.stdout
    assert sorted((state, attempts) for state, _c, _l, attempts in rows(runtime)) == [
        ("failed", 50),
        ("pending", 0),
        ("pending", 0),
    ]
    audited = await runtime.db.read(
        lambda session: list(session.scalars(select(AuditEntry).where(AuditEntry.action == "outbox-retry")))
    )
    assert len(audited) == 2 and all(
        entry.transport == "cli" and entry.actor.startswith("user:") for entry in audited
    )

    doctor = await asyncio.to_thread(pms_bridge, "doctor", "--config", config)
    (line,) = [line for line in doctor.stdout.splitlines() if "(outbox)" in line]
    assert line.startswith("WARN pushes to PMSs (outbox): 1 dentrix-thumbnails message failed"), line
    assert "vdds-push" not in line


async def test_a_stopping_worker_hands_its_claims_back(make_settings: Any) -> None:
    """Cancelled mid-send (SIGTERM, the stop file), a worker ends its claims on the message being sent
    and on those claimed with it: the next start (or another daemon) settles them at once, instead of
    after the lease, and asks the channel's recover hook whether the PMS has them."""
    settings = make_settings(daemon={"outbox_lease": 3600})
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 2)
        sender = BlockingSender()
        sending = asyncio.create_task(OutboxWorker(a, "test", sender).run_once())
        await sender.started.wait()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        now = utcnow()
        assert [(state, claimer) for state, claimer, _lease, _n in rows(a)] == [
            ("sending", a.instance_id)
        ] * 2
        assert all(lease is not None and lease <= now for _s, _c, lease, _n in rows(a))
        assert await OutboxWorker(b, "test", sender).recover() == 2  # the next start: no wait
        assert [state for state, *_rest in rows(a)] == ["pending", "pending"]


# --------------------------------------------------------------------------------------------------
# A message is sent only by the daemon holding its claim: the whole batch's claims are kept alive, each
# is checked before its send, and a send whose claim is lost is cut off


class SlowPms:
    """A PMS taking pushes: the first send waits for `gate` (an import program at work, longer than the
    lease); the others arrive at once. Records what arrived, across daemons, and which sends were cut
    off (cancelled) before they arrived."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.arrived: list[int] = []
        self.cut: list[int] = []

    async def __call__(self, _rt: Runtime, item: OutboxItem) -> None:
        first = not self.started.is_set()
        self.started.set()
        try:
            if first:
                await self.gate.wait()
        except asyncio.CancelledError:
            self.cut.append(item.id)
            raise
        self.arrived.append(item.id)


async def take_over(rt: Runtime, message_id: int, instance: str) -> None:
    """Another daemon now holds message `message_id` (it took the claim over after this one's lease ran
    out: a paused VM, or clocks apart)."""

    def work(session: Session) -> None:
        session.execute(
            update(OutboxMessage)
            .where(OutboxMessage.id == message_id)
            .values(claimed_by=instance, lease_until=utcnow() + timedelta(hours=1))
        )

    await rt.db.write(work, watched=False)


async def test_a_batch_claimed_together_stays_with_its_daemon_while_a_slow_push_runs(
    make_settings: Any,
) -> None:
    """The auditor's case: daemon A claims messages 1 and 2 together; the PMS takes longer than the
    lease over message 1. Before, only message 1's claim was renewed: message 2's ran out, daemon B took
    it over and sent it, and A then sent it again. Every claim A holds is renewed now, so B leaves
    message 2 alone and the PMS gets each push once."""
    settings = make_settings(daemon={"outbox_lease": 1})
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 2)
        pms = SlowPms()
        sending = asyncio.create_task(OutboxWorker(a, "test", pms).run_once())
        await pms.started.wait()
        [_first, (state, claimer, second_lease, _n)] = rows(a)
        assert (state, claimer) == ("sending", a.instance_id) and second_lease is not None
        await until(lambda: utcnow() > second_lease, "message 2's first lease to have run out")
        other = OutboxWorker(b, "test", pms, backoff=(0.0,))
        assert await other.recover() == 0
        assert await other.run_once() == 0
        pms.gate.set()
        assert await sending == 2
        assert sorted(pms.arrived) == [1, 2]
        assert [(state, claimer) for state, claimer, *_rest in rows(a)] == [("done", a.instance_id)] * 2


async def test_a_send_whose_claim_another_daemon_took_over_is_cut_off(make_settings: Any) -> None:
    """A daemon whose claim on the message it is sending was taken over (it stalled past its lease)
    stops that send as soon as its renewal finds out, instead of handing the push to the PMS after
    the new holder did; the message is the new holder's to settle."""
    settings = make_settings(daemon={"outbox_lease": 1})
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 1)
        pms = SlowPms()
        sending = asyncio.create_task(OutboxWorker(a, "test", pms).run_once())
        await pms.started.wait()
        await take_over(a, 1, b.instance_id)
        await until(lambda: bool(pms.cut), "A to cut its send off")
        assert await sending == 1
        pms.gate.set()
        assert pms.arrived == [] and pms.cut == [1]
        assert rows(a)[0][:2] == ("sending", b.instance_id)


async def test_a_message_whose_claim_was_lost_meanwhile_is_not_sent(make_settings: Any) -> None:
    """Messages 1 and 2 claimed together; message 2's claim is taken over while message 1 is sent. The
    claim is checked (and extended) in the store right before each send, so A skips message 2."""
    settings = make_settings(daemon={"outbox_lease": 60})
    with two_daemons(settings) as (a, b):
        await seed_messages(a, 2)
        pms = SlowPms()
        sending = asyncio.create_task(OutboxWorker(a, "test", pms).run_once())
        await pms.started.wait()
        await take_over(a, 2, b.instance_id)
        pms.gate.set()
        assert await sending == 2
        assert pms.arrived == [1]
        assert [(state, claimer) for state, claimer, *_rest in rows(a)] == [
            ("done", a.instance_id),
            ("sending", b.instance_id),
        ]


@contextlib.contextmanager
def writes_held_up(url: str) -> Iterator[None]:
    """Another session holds the outbox rows (SQLite: the write lock), as a store that stops answering
    a daemon's writes does: that daemon's renewals wait."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(str(make_url(url).database), isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        return
    engine = create_engine(url)
    try:
        with engine.connect() as pg:
            pg.execute(text("SELECT id FROM outbox FOR UPDATE"))
            yield
            pg.rollback()
    finally:
        engine.dispose()


async def test_claims_not_renewed_within_the_lease_are_given_up(make_settings: Any) -> None:
    """The store does not take A's renewals for a whole lease: A cannot know whether another daemon
    took its claims over by now, so it stops the send in progress and sends none of the batch; once
    their leases have run out they are taken over (here by A's own next pass) and settled."""
    settings = make_settings(daemon={"outbox_lease": 1})
    a = Runtime.build(settings)
    try:
        await seed_messages(a, 2)
        pms = SlowPms()
        worker = OutboxWorker(a, "test", pms)
        sending = asyncio.create_task(worker.run_once())
        await pms.started.wait()
        with writes_held_up(settings.store.url):
            await until(lambda: bool(pms.cut), "A to give its claims up")
            assert await sending == 2
        pms.gate.set()
        assert pms.arrived == [] and pms.cut == [1]
        await until(
            lambda: all(lease is not None and lease < utcnow() for _s, _c, lease, _n in rows(a)),
            "A's leases to run out",
        )
        assert await worker.recover() == 2
        assert await worker.run_once() == 0  # due again after the backoff
        assert [state for state, *_rest in rows(a)] == ["pending", "pending"]
    finally:
        a.close()

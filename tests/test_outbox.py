"""The persistent outbox: several daemons sharing one store deliver each message once."""

from __future__ import annotations

import asyncio

from bridge.outbox import OutboxItem, OutboxWorker
from bridge.runtime import Runtime
from bridge.store.models import OutboxMessage, Patient
from bridge.store.types import utcnow


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

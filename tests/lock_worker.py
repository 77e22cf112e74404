"""A lock client process for the safety tests: tasks contend for one lock and write their critical
sections through a fenced resource. Every attempt is logged as a JSON line (flushed), so a SIGKILL
loses nothing already written.

Usage: python lock_worker.py ADDRESSES DATABASE_URL LOG_FILE SECONDS TASKS [--freeze-probe]
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from datetime import timedelta

import asyncpg

from muster.client import Cluster, LockLostError
from muster.client import errors as E

ENTER = """
WITH ok AS (UPDATE resource SET fence = $1 WHERE id = 1 AND fence <= $1 RETURNING 1)
INSERT INTO sections (token, phase, worker) SELECT $1, $2, $3 FROM ok RETURNING at
"""


async def main(addresses: str, url: str, log_path: str, seconds: float, tasks: int) -> None:
    pool = await asyncpg.create_pool(url, min_size=2, max_size=tasks + 2)
    log = open(log_path, "a", buffering=1)  # noqa: SIM115, ASYNC230 - line-buffered: survives SIGKILL line by line
    end = time.monotonic() + seconds
    me = f"w{random.randrange(10**6)}"

    async def guarded(token: int, phase: str) -> bool:
        async with pool.acquire() as con:
            return await con.fetchval(ENTER, token, phase, me) is not None

    async with Cluster.connect(addresses, deadline=timedelta(seconds=5)) as cluster:

        async def task(k: int) -> None:
            rng = random.Random(k)
            while time.monotonic() < end:
                started = time.monotonic()
                record: dict = {"worker": me, "task": k, "start": started}
                try:
                    async with cluster.lock("hot", ttl=timedelta(seconds=1), wait=timedelta(seconds=3)) as lease:
                        record["waited"] = time.monotonic() - started
                        record["token"] = lease.token
                        record["enter"] = await guarded(lease.token, "enter")
                        await asyncio.sleep(rng.uniform(0.002, 0.02))
                        lease.ensure_held()
                        record["exit"] = await guarded(lease.token, "exit")
                    record["ok"] = True
                except (E.LockHeldError, LockLostError, E.UnavailableError, E.DeadlineExceededError) as exc:
                    record["ok"] = False
                    record["error"] = type(exc).__name__
                    record["waited"] = time.monotonic() - started
                log.write(json.dumps(record) + "\n")

        await asyncio.gather(*(task(k) for k in range(tasks)))
    await pool.close()


if __name__ == "__main__":
    a, u, p, s, t = sys.argv[1:6]
    asyncio.run(main(a, u, p, float(s), int(t)))

"""Profile a drain: py-spy on the worker child and pg_stat_statements on the server.

    DATABASE_URL=postgresql://postgres@127.0.0.1:55433/postgres \\
        .venv/bin/python bench/profile_drain.py --py-spy /tmp/pyspy/bin/py-spy --out /tmp/prof

Needs a server with ``shared_preload_libraries = pg_stat_statements`` (the embedded wheel has
no contrib modules; the system's Postgres 15 has) and py-spy (``pip install --target DIR
py-spy``). Creates and drops the database ``qdworker_prof``. Default settings, like the bench.
Writes ``OUT/worker.raw`` (py-spy collapsed stacks) and prints the top self / inclusive frames
and the statements by total time.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import trio
from psycopg.conninfo import make_conninfo

ROOT = Path(os.environ.get("QDWORKER_ROOT") or Path(__file__).resolve().parent.parent)
sys.path.insert(0, str(ROOT))

from qdworker import Queue  # noqa: E402
from qdworker._benchmark import procs  # noqa: E402
from qdworker._benchmark.jobs import NOOP  # noqa: E402

DB = "qdworker_prof"


def top_frames(raw: Path, limit: int = 25) -> str:
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        self_t[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    out = [f"samples: {total}", "-- self --"]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in self_t.most_common(limit)]
    out.append("-- inclusive --")
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(limit)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--py-spy", default="py-spy")
    ap.add_argument("--out", type=Path, default=Path("/tmp/qdworker-prof"))
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the supervisor")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    server = os.environ["DATABASE_URL"]
    url = make_conninfo(server, dbname=DB)
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        c.execute(f"CREATE DATABASE {DB}")
    log = args.out / "supervisor.log"
    log.unlink(missing_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.env)
    sup = procs.Supervisor(url, log, PYTHONPATH=str(ROOT), **extra)  # the bench's supervisor
    subprocess.run(
        [sys.executable, "-m", "qdworker", "migrate"],
        env=sup.env,
        check=True,
        stdout=subprocess.DEVNULL,
    )

    async def bulk() -> None:
        async with Queue(url) as q:
            await q.submit_jobs([{"type": NOOP} for _ in range(args.n)])

    trio.run(bulk)
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        c.execute("ANALYZE worker_jobs")
        c.execute("CHECKPOINT")
        c.execute("SELECT pg_stat_statements_reset()")
    sup.start()
    worker = None
    while worker is None:
        kids = procs.children_of(sup.pid)
        worker = kids[0] if kids else None
        time.sleep(0.005)
    spy = subprocess.Popen(
        [
            args.py_spy,
            "record",
            "-p",
            str(worker),
            "-r",
            str(args.rate),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "-o",
            str(args.out / "worker.raw"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with psycopg.connect(url, autocommit=True) as c:
        while c.execute(
            "SELECT count(*) FROM worker_jobs WHERE finished IS NULL AND type = %s", (NOOP,)
        ).fetchone()[0]:
            time.sleep(0.05)
        first, last = c.execute(
            "SELECT extract(epoch FROM min(started)), extract(epoch FROM max(finished))"
            " FROM worker_jobs WHERE type = %s",
            (NOOP,),
        ).fetchone()
        stats = c.execute(
            "SELECT calls, round(total_exec_time::numeric, 1), rows,"
            " left(regexp_replace(query, '\\s+', ' ', 'g'), 90)"
            " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)"
            " ORDER BY total_exec_time DESC LIMIT 12",
            (DB,),
        ).fetchall()
    worker_cpu = procs.cpu_seconds(worker)
    spy.send_signal(2)
    spy.wait(30)
    sup.stop(timeout_s=60)
    seconds = float(last - first)
    print(
        f"drain {args.n} in {seconds:.3f} s = {args.n / seconds:,.0f} jobs/s; "
        f"worker CPU {worker_cpu} s (incl. start-up)"
    )
    print("calls  total_ms  rows  query")
    for calls, ms, rows, query in stats:
        print(f"{calls:6d} {ms:9} {rows:7d}  {query}")
    raw = args.out / "worker.raw"
    if raw.exists():
        print(top_frames(raw))
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")


if __name__ == "__main__":
    main()

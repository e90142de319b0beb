"""What one idle consumer costs on the embedded broker: fetches a second and CPU (ADR 0020).

    python bench/idle_fetch.py [--seconds 4] [--json]

Starts the embedded stack, creates a topic of 4 empty partitions, and for each consumer
configuration below assigns them to one consumer that polls for `--seconds`: librdkafka's own
statistics count its Fetch requests, and /proc gives the CPU of the broker process and of this
process (the consumer's librdkafka threads are nearly all of it). A broker that holds an empty
fetch for `fetch.wait.max.ms` makes ~2 fetches a second here; one that answers at once spins.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from orchestrator.dev.embedded import EmbeddedStack

CONFIGS: list[dict[str, Any]] = [
    {},
    {"fetch.wait.max.ms": 500},
    {"fetch.wait.max.ms": 500, "fetch.min.bytes": 100_000},
    {"fetch.wait.max.ms": 500, "api.version.request": False,
     "broker.version.fallback": "0.10.2.1"},
]
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User plus system CPU of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def measure(bootstrap: str, topic: str, broker_pid: int, config: dict[str, Any],
            seconds: float) -> dict[str, Any]:
    stats: list[dict[str, Any]] = []
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"idle-{uuid.uuid4()}",
                         "statistics.interval.ms": 1000,
                         "stats_cb": lambda raw: stats.append(json.loads(raw)), **config})
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(4)])
    started, broker_before, own_before = time.monotonic(), cpu_s(broker_pid), cpu_s(os.getpid())
    while time.monotonic() - started < seconds:
        consumer.poll(0.2)
    elapsed = time.monotonic() - started
    broker_cpu, own_cpu = cpu_s(broker_pid) - broker_before, cpu_s(os.getpid()) - own_before
    consumer.close()
    fetches = [sum(b["req"].get("Fetch", 0) for b in s["brokers"].values()) for s in stats]
    return {"config": config,
            "fetches_per_s": round((fetches[-1] - fetches[0]) / (len(fetches) - 1))
            if len(fetches) > 1 else None,
            "broker_cpu_pct": round(broker_cpu / elapsed * 100),
            "consumer_process_cpu_pct": round(own_cpu / elapsed * 100)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with EmbeddedStack() as stack:
        assert stack.broker.process is not None
        bootstrap = stack.broker.bootstrap
        topic = f"idle-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        for future in admin.create_topics([NewTopic(topic, 4, 1)]).values():
            future.result(30)
        rows = [measure(bootstrap, topic, stack.broker.process.pid, config, args.seconds)
                for config in CONFIGS]
    if args.json:
        print(json.dumps({"broker": stack.broker.kind, "consumers": rows}))
        return
    print(f"one idle consumer of 4 empty partitions on the embedded {stack.broker.kind}:")
    for row in rows:
        print(f"  {row['fetches_per_s']!s:>7} fetches/s, broker {row['broker_cpu_pct']:>3}% CPU,"
              f" consumer {row['consumer_process_cpu_pct']:>3}%  {row['config'] or 'defaults'}")


if __name__ == "__main__":
    main()

"""A task that publishes numbered events in a loop until it is stopped (tests/test_mqtt.py).

Every 50th publish waits for the broker's ack, which keeps the backlog small and puts some
of the stop requests inside a waiting publish. It prints ``PUBLISHING`` once 200 publishes
returned, and ``SENT <n>`` in teardown: ``n`` publish calls returned (a publish interrupted
by the signal is not among them, and may or may not have been sent).
"""

from __future__ import annotations

from keeper_task import Task, TaskContext, TaskSettings


class PublishLoop(Task[TaskSettings]):
    """Publishes ``{"i": n}`` to the job's event topic until a signal ends ``run()``."""

    publishes = ("Jobs/{job_id}/events",)
    sent = 0

    def run(self, ctx: TaskContext[TaskSettings]) -> None:
        while True:
            ctx.publish_event({"i": self.sent}, wait=self.sent % 50 == 49)
            self.sent += 1
            if self.sent == 200:
                print("PUBLISHING", flush=True)

    def teardown(self, ctx: TaskContext[TaskSettings]) -> None:
        print(f"SENT {self.sent}", flush=True)


if __name__ == "__main__":
    PublishLoop.main()

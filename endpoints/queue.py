"""QueueController: reload due rows into memory now, and the queue's counts and the live
processes of the fleet."""

from litestar import Controller, get, post
from litestar.exceptions import NotAuthorizedException
from litestar.status_codes import HTTP_200_OK

from endpoints.deps import QueueDep, StoreDep
from endpoints.schemas import ProcessOut, QueueStatsOut, ReloadOut


class QueueController(Controller):
    path = "/queue"
    tags = ("queue",)

    @post(
        "/reload", operation_id="reload_queue", status_code=HTTP_200_OK, raises=[NotAuthorizedException]
    )
    async def reload(self, job_queue: QueueDep) -> ReloadOut:
        """What the scheduler does every few seconds, now: after fixing a database by hand, or
        to pick up jobs another process left. A process that runs no worker loads nothing."""
        return ReloadOut(loaded=await job_queue.reload())

    @get("/stats", operation_id="queue_stats", raises=[NotAuthorizedException])
    async def stats(self, job_queue: QueueDep, job_store: StoreDep) -> QueueStatsOut:
        stats = await job_queue.stats()
        running = stats.stats.running_owners
        return QueueStatsOut(
            in_memory=stats.in_memory,
            by_status=dict(stats.stats.by_status),
            by_task_type={name: dict(counts) for name, counts in stats.stats.by_task_type.items()},
            running_by_process=dict(running),
            processes=[
                ProcessOut(owner=p.owner, role=p.role, host=p.host, pid=p.pid,
                           started_at=p.started_at, last_seen_at=p.last_seen_at,
                           running=running.get(p.owner, 0))
                for p in await job_store.live_processes()
            ],
        )

"""Celery tasks: each receives ids and calls one service."""

from celery import shared_task

from coordinator import services


@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=5, default_retry_delay=5)
def round_aggregate_task(self, round_id: int) -> str:
    try:
        return services.round_aggregate(round_id=round_id)
    except services.TransientAggregationError as error:
        raise self.retry(exc=error) from error


@shared_task(acks_late=True)
def rounds_enforce_deadlines_task() -> list[int]:
    return services.rounds_enforce_deadlines()


@shared_task(acks_late=True)
def rounds_requeue_stalled_aggregations_task() -> list[int]:
    return services.rounds_requeue_stalled_aggregations()

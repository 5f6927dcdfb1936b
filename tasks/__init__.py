"""Celery task modules. Every task is idempotent (it may run twice: late acks, re-sends by the
outbox sweep, retries) and derives from worker.base.TaskBase."""

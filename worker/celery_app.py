from worker.app import celery_from_environment  # `celery -A worker.celery_app worker|beat|flower`
app = celery_from_environment()

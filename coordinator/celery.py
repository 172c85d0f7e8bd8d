"""The Celery application. Start a worker with ``celery -A coordinator worker -Q celery,aggregation``."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "coordinator.settings")

app = Celery("coordinator")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["coordinator"])

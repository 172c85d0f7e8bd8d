from django.conf import settings
from django.core.management.base import BaseCommand

from coordinator import embedded_redis


class Command(BaseCommand):
    help = "Start, stop or show the embedded Redis server used when REDIS_URL is unset."

    def add_arguments(self, parser):
        parser.add_argument("action", choices=["start", "stop", "status"])

    def handle(self, *args, action: str, **options):
        directory = settings.VAR_DIR / "redis"
        if action == "stop":
            stopped = embedded_redis.stop(directory)
            self.stdout.write("stopped" if stopped else "not running")
        elif action == "start":
            self.stdout.write(embedded_redis.ensure_running(directory))
        else:
            self.stdout.write(f"REDIS_URL in use: {settings.REDIS_URL}")

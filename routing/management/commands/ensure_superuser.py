from __future__ import annotations

import os
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Create the admin user named by DJANGO_SUPERUSER_USERNAME/_PASSWORD if it does not exist."

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD")
        if not username or not password:
            self.stdout.write("No DJANGO_SUPERUSER_USERNAME/PASSWORD set; see the README to create an admin.")
            return
        users = get_user_model()
        if users.objects.filter(username=username).exists():
            self.stdout.write(f"Admin user {username!r} exists.")
            return
        users.objects.create_superuser(username=username, password=password, email="")
        self.stdout.write(self.style.SUCCESS(f"Created admin user {username!r}."))

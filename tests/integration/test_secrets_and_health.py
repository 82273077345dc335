"""Secrets and exposure (issue 11, item 6).

- With SECRET_KEY unset there is no public default: a random key is generated once into
  var/secret_key (mode 0600) and reused; processes starting at once agree on one key.
- With a router api key (ROUTER_API_KEY, or the one stored in the database), /health
  answers anyone with its status only; the per-server detail needs the key.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from nomyo_site.secret_key import SecretKeyError, load_or_create
from tests.conftest import REPO, free_port

KEY = "health-test-key"


# -- the secret key ------------------------------------------------------------------
def test_a_key_is_generated_once_with_mode_0600_and_reused(tmp_path: Path, capsys) -> None:
    path = tmp_path / "var" / "secret_key"
    first = load_or_create(path)
    assert len(first) >= 50 and first.isprintable()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in capsys.readouterr().err  # says where it is, once
    assert load_or_create(path) == first
    assert capsys.readouterr().err == ""
    assert load_or_create(tmp_path / "elsewhere") != first  # random, not a constant
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret_key"]  # no temporary left


def test_an_empty_key_file_is_an_error_that_names_it(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    path.write_text("\n")
    with pytest.raises(SecretKeyError, match=str(path)):
        load_or_create(path)
    assert path.read_text() == "\n"  # never replaced behind the operator's back


def test_processes_starting_at_once_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    code = "import sys; from pathlib import Path; from nomyo_site.secret_key import load_or_create as f; "
    code += "print(f(Path(sys.argv[1])))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(12)
    ]
    results = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    keys = {out.strip() for out, _ in results}
    assert keys == {path.read_text().strip()}
    assert sum("generated" in err for _, err in results) == 1  # one process created it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret_key"]


def _settings_key(**env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    full.update(DJANGO_SETTINGS_MODULE="nomyo_site.settings", **env)
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=full, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_settings_use_the_stored_key_unless_secret_key_is_set() -> None:
    dotenv = REPO / ".env"
    if dotenv.exists() and "SECRET_KEY" in dotenv.read_text():
        pytest.skip("this checkout's .env sets SECRET_KEY")
    stored = _settings_key()
    assert stored == (REPO / "var" / "secret_key").read_text().strip()
    assert _settings_key(SECRET_KEY="") == stored  # empty counts as unset
    assert _settings_key(SECRET_KEY="my-own-key") == "my-own-key"
    assert "insecure" not in stored and "change-me" not in stored


# -- /health -------------------------------------------------------------------------
def _health(url: str, key: str | None = None, method: str = "GET") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.request(method, url + "/health", headers=headers, timeout=15)


def _assert_status_only(reply: httpx.Response, status: str, *secrets: str) -> None:
    assert reply.json() == {"status": status}
    for secret in secrets:
        assert secret not in reply.text


@pytest.fixture
def two_servers(fakes, endpoint):
    fake = fakes(models=["llama3:latest"])
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    endpoint(fake.url, name="gpu-up", max_concurrent_connections=1)
    endpoint(dead_url, name="gpu-down", max_concurrent_connections=1)
    return fake.url, dead_url


def test_health_shows_only_its_status_without_the_router_key(two_servers, router) -> None:
    up_url, dead_url = two_servers
    server = router(ROUTER_API_KEY=KEY)
    for key in (None, "wrong", KEY[:-1]):
        reply = _health(server.url, key)
        assert reply.status_code == 200
        _assert_status_only(reply, "ok", up_url, dead_url, "gpu-up", "gpu-down", "refused", "127.0.0.1")
    assert _health(server.url, method="HEAD").status_code == 200
    full = _health(server.url, KEY)
    assert full.status_code == 200
    detail = full.json()["endpoints"]
    assert detail["gpu-up"]["status"] == "ok" and detail["gpu-up"]["version"]
    assert detail["gpu-down"]["status"] == "error" and detail["gpu-down"]["error"]
    # every other route still wants the key
    assert httpx.get(server.url + "/api/tags").status_code == 401


def test_health_hides_the_detail_behind_the_key_stored_in_the_database(fakes, endpoint, router) -> None:
    from routing.models import RouterSettings

    dead_url = f"http://127.0.0.1:{free_port()}"
    endpoint(dead_url, name="only-down", max_concurrent_connections=1)
    RouterSettings.objects.update_or_create(pk=1, defaults={"api_key": "db-" + KEY})
    server = router()
    reply = _health(server.url)
    assert reply.status_code == 503
    _assert_status_only(reply, "error", dead_url, "only-down", "refused")
    full = _health(server.url, "db-" + KEY)
    assert full.status_code == 503 and full.json()["endpoints"]["only-down"]["status"] == "error"


def test_health_shows_the_detail_to_anyone_when_no_router_key_is_set(two_servers, router) -> None:
    server = router()
    reply = _health(server.url)
    assert reply.status_code == 200 and set(reply.json()["endpoints"]) == {"gpu-up", "gpu-down"}

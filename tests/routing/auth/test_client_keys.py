"""Client keys: format, hash-only storage, the commands, the key store and its reload
(routing/auth/client_keys.py, routing/management/commands/client_key_*.py)."""

from __future__ import annotations

import io
import math
import re
from collections import Counter

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from routing.auth import client_keys
from routing.auth.client_keys import KeyStore, hash_key, new_key
from routing.models import ClientKey

KEY_RE = re.compile(r"^nr-[A-Za-z0-9_-]{43}$")


def create(*args: str) -> str:
    out = io.StringIO()
    call_command("client_key_create", *args, stdout=out)
    return out.getvalue().rstrip("\n").splitlines()[-1]


def test_keys_are_high_entropy_and_prefixed():
    keys = [new_key() for _ in range(200)]
    assert all(KEY_RE.match(k) for k in keys) and len(set(keys)) == 200
    body = "".join(k[3:] for k in keys)
    counts = Counter(body)
    entropy = -sum(c / len(body) * math.log2(c / len(body)) for c in counts.values())
    assert entropy > 5.9  # close to log2(64) = 6 bits per character


@pytest.mark.django_db
def test_create_prints_the_key_alone_on_the_last_line_and_stores_only_its_hash():
    users = get_user_model()
    users.objects.create(username="ana")
    key = create(
        "team-a",
        "--owner",
        "ana",
        "--models",
        "llama3*, qwen2:7b",
        "--rpm",
        "10",
        "--tpm",
        "1000",
        "--concurrency",
        "2",
        "--daily-tokens",
        "5000",
        "--monthly-tokens",
        "90000",
        "--priority",
        "high",
        "--expires",
        "2030-01-02",
    )
    assert KEY_RE.match(key)
    row = ClientKey.objects.get(name="team-a")
    assert row.key_hash == hash_key(key) and row.prefix == key[:11]
    assert key not in str(ClientKey.objects.filter(name="team-a").values().get())  # never stored
    assert row.owner is not None and row.owner.username == "ana"
    assert (row.rpm, row.tpm, row.concurrency, row.daily_tokens, row.monthly_tokens) == (
        10,
        1000,
        2,
        5000,
        90000,
    )
    assert row.priority == "high" and row.allowed_models == "llama3*, qwen2:7b"
    assert row.expires is not None and row.expires.isoformat() == "2030-01-02T00:00:00+00:00"
    record = client_keys.record_of(row)
    assert record.principal.limit("rpm") == 10 and record.principal.priority == 0
    assert record.principal.may_use("llama3:8b") and record.principal.may_use("qwen2:7b")
    assert not record.principal.may_use("qwen2:72b") and not record.principal.may_use("mistral")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args,message",
    [
        (["anonymous"], "reserved"),
        (["x", "--owner", "nobody"], "no user"),
        (["x", "--expires", "soon"], "ISO"),
    ],
)
def test_create_refuses_bad_input(args, message):
    with pytest.raises(CommandError, match=message):
        create(*args)
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_create_refuses_a_duplicate_name_and_revoke_an_unknown_one():
    create("dup")
    with pytest.raises(CommandError):
        create("dup")
    with pytest.raises(CommandError, match="no client key"):
        call_command("client_key_revoke", "nope", stdout=io.StringIO())


@pytest.mark.django_db(transaction=True)
def test_the_store_sees_create_and_revoke_on_the_next_lookup(settings):
    settings.REDIS_URL = ""
    store = client_keys.key_store
    store.clear()
    key = create("svc")

    async def lookup() -> client_keys.KeyRecord | None:
        await store.ensure_fresh()
        return store.get(key)

    found = async_to_sync(lookup)()
    assert found is not None and found.refusal(0) is None and store.defined()
    call_command("client_key_revoke", "svc", stdout=io.StringIO())
    revoked = async_to_sync(lookup)()
    assert revoked is not None and revoked.refusal(0) == "the key 'svc' is disabled"
    assert async_to_sync(_get)(store, "nr-unknown") is None


async def _get(store: KeyStore, key: str) -> client_keys.KeyRecord | None:
    await store.ensure_fresh()
    return store.get(key)


@pytest.mark.django_db
def test_an_expired_key_is_refused_and_its_creation_says_so():
    out, err = io.StringIO(), io.StringIO()
    call_command("client_key_create", "old", "--expires", "2020-01-01", stdout=out, stderr=err)
    assert "has passed: the key is refused (403)" in err.getvalue()
    key = out.getvalue().rstrip("\n").splitlines()[-1]  # still the key alone on the last line
    record = client_keys.record_of(ClientKey.objects.get(name="old"))
    assert record.refusal(2e9) == "the key 'old' has expired"
    assert hash_key(key) == ClientKey.objects.get(name="old").key_hash
    later = io.StringIO()
    call_command("client_key_create", "later", "--expires", "2999-01-01", stdout=io.StringIO(), stderr=later)
    assert later.getvalue() == ""


@pytest.mark.asyncio
async def test_a_reload_started_before_a_change_is_not_joined_nor_put_in_after_a_later_one(monkeypatch):
    import asyncio
    import threading

    from routing.auth.client_keys import KeyRecord
    from routing.auth.principal import Principal

    store = KeyStore()
    before = {"old": KeyRecord(Principal("old", "key", key_id=1), True, None)}
    after = {"new": KeyRecord(Principal("new", "key", key_id=1), False, None)}
    slow = threading.Event()
    loads: list[int] = []

    def load():
        loads.append(len(loads))
        if len(loads) == 1:  # the first reload read the table before the change, and is slow
            slow.wait(5)
            return before, 1
        return after, 2

    monkeypatch.setattr(client_keys, "load_keys", load)
    first = asyncio.ensure_future(store.ensure_fresh())
    await asyncio.sleep(0.05)
    store.invalidate()  # the change
    await store.ensure_fresh()  # a new reload, not the one in flight
    assert store._by_hash is after and store.redis_generation == 2
    slow.set()
    await first
    assert store._by_hash is after and store.redis_generation == 2  # the older copy is not put in
    assert len(loads) == 2


@pytest.mark.asyncio
async def test_a_copy_whose_redis_generation_could_not_be_read_is_reloaded_within_a_second(
    monkeypatch, settings
):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    settings.ROUTER_REGISTRY_RELOAD = 120
    store = KeyStore()
    monkeypatch.setattr(client_keys, "load_keys", lambda: ({}, None))
    await store.ensure_fresh()
    assert store.fresh()
    store._loaded_at -= 1.1
    assert not store.fresh()  # not 120 s: nothing could tell this copy is stale


# -- what `client_key_create` and the model refuse (a hostile tester's findings) ------------------
@pytest.mark.django_db
@pytest.mark.parametrize("option", ["--rpm", "--tpm", "--concurrency", "--daily-tokens", "--monthly-tokens"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_create_refuses_a_limit_below_one_in_words(option, value):
    """A limit of 0 would answer every request 429 with Retry-After: 1, forever."""
    with pytest.raises(CommandError) as refused:
        create("zero", option, value)
    message = str(refused.value)
    assert option in message and "at least 1" in message and "leave the option out" in message
    assert "_limit" not in message and "_positive" not in message and "invalid" not in message
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_create_refuses_a_limit_that_is_no_whole_number():
    with pytest.raises(CommandError, match=r"--rpm: '1\.5' is not a whole number"):
        create("half", "--rpm", "1.5")


@pytest.mark.django_db
@pytest.mark.parametrize("models", [",,, ,", " ", "", "\n,\n"])
def test_create_refuses_a_models_list_that_names_no_model(models):
    """Such a list used to make a key for every model."""
    with pytest.raises(CommandError, match="names no model"):
        create("blank-list", "--models", models)
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_the_model_refuses_allowed_models_that_name_no_model():
    from django.core.exceptions import ValidationError

    row = ClientKey(name="blank-list", prefix="nr-x", key_hash="0" * 64, allowed_models=",,, ,")
    with pytest.raises(ValidationError) as refused:
        row.full_clean()
    assert "allowed_models" in refused.value.message_dict
    row.allowed_models = ""  # empty: every model
    row.full_clean()


@pytest.mark.django_db
def test_an_unknown_owner_is_explained():
    with pytest.raises(CommandError, match="--owner names an existing Django user"):
        create("team-a", "--owner", "ana")


@pytest.mark.django_db
def test_the_readme_example_runs_once_its_owner_exists():
    """The README's client_key_create example, as written, on a fresh database: it says --owner
    names an existing user, and runs once that user exists."""
    import shlex
    from pathlib import Path

    readme = Path(__file__).resolve().parents[3] / "README.md"
    section = readme.read_text().split("## Keys and quotas", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    command = next(line for line in block.replace("\\\n", " ").splitlines() if "client_key_create" in line)
    args = shlex.split(command, comments=True)
    args = args[args.index("client_key_create") + 1 :]
    owner = args[args.index("--owner") + 1]
    assert "names an existing Django user" in block
    get_user_model().objects.create(username=owner)
    assert KEY_RE.match(create(*args))


def test_a_bad_expiry_is_a_usage_error_not_a_traceback(capsys):
    """From the command line: argparse's usage line and exit status 2."""
    from routing.management.commands.client_key_create import Command

    with pytest.raises(SystemExit) as stopped:
        Command().run_from_argv(["manage.py", "client_key_create", "x", "--expires", "tomorrow"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--expires: 'tomorrow' is not an ISO date" in err
    assert "Traceback" not in err


GOOD_NAMES = ["team-a", "claude-code", "svc_bot", "ana@example.org", "team.b", "_x", "7", "x" * 100]
BAD_NAMES = [
    "a\nb",  # would split the access-log line
    "a b",  # `client=a b` is two fields of the access log
    "-",  # the access log's mark for a missing or unknown key
    "anonymous",
    "Operator",  # the other principals' usage names, in any case
    "=1+1,x",  # a formula in a spreadsheet
    "+x",
    "-x",
    "@x",
    "x\ty",
    "ü",
    "x" * 101,
]


@pytest.mark.django_db
@pytest.mark.parametrize("name", BAD_NAMES)
def test_create_refuses_a_name_that_logs_statistics_or_spreadsheets_would_misread(name):
    with pytest.raises(CommandError, match="name: "):
        create("--", name)  # `--`: "-" and "-x" are the name, not options
    assert not ClientKey.objects.exists()


@pytest.mark.django_db
def test_create_accepts_ordinary_names():
    for name in GOOD_NAMES:
        assert KEY_RE.match(create(name))
    assert sorted(ClientKey.objects.values_list("name", flat=True)) == sorted(GOOD_NAMES)


@pytest.mark.django_db(transaction=True)
def test_the_migration_disables_a_key_whose_limit_was_zero_and_the_database_refuses_zero():
    """0005: a key with a limit of 0 (refused every request) is disabled with that limit at 1; the
    others keep theirs. From then on the database itself refuses a limit of 0."""
    from django.db import IntegrityError, transaction

    from tests.stats.migrating import migrate, migrate_to_latest

    before = [("routing", "0004_model_alias")]
    old = migrate(before).loader.project_state(before).apps.get_model("routing", "ClientKey")
    old.objects.create(name="blocked", prefix="nr-a", key_hash="a" * 64, rpm=0, daily_tokens=0, tpm=500)
    old.objects.create(name="fine", prefix="nr-b", key_hash="b" * 64, rpm=5)
    try:
        migrate_to_latest()
        rows = {r.name: r for r in ClientKey.objects.all()}
        blocked, fine = rows["blocked"], rows["fine"]
        assert not blocked.enabled and (blocked.rpm, blocked.daily_tokens, blocked.tpm) == (1, 1, 500)
        assert fine.enabled and fine.rpm == 5 and fine.daily_tokens is None
        for limit in ("rpm", "tpm", "concurrency", "daily_tokens", "monthly_tokens"):
            with pytest.raises(IntegrityError), transaction.atomic():
                ClientKey.objects.filter(name="fine").update(**{limit: 0})
    finally:
        ClientKey.objects.all().delete()
        migrate_to_latest()

"""Importing a NOMYO Router config.yaml (routing/fleet/services.py, the import_config command)."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from routing.models import Endpoint, FallbackChain, ModelAlias, RouterSettings

CONFIG = """
endpoints:
  - http://gpu-1:11434
  - http://gpu-2:11434/
  - http://vllm-box:8000/v1
llama_server_endpoints:
  - http://llama-cpp:8080/v1
max_concurrent_connections: 3
nomyo-router-api-key: "${ROUTER_TEST_KEY}"
api_keys:
  "http://llama-cpp:8080/v1": "${LLAMA_KEY}"
  "http://gpu-1:11434": "plain-key"
"""


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ROUTER_TEST_KEY", "router-secret")
    monkeypatch.setenv("LLAMA_KEY", "llama-secret")
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.django_db
def test_it_imports_endpoints_kinds_limits_and_keys(config_file: Path):
    call_command("import_config", str(config_file))
    rows = {ep.url: ep for ep in Endpoint.objects.all()}
    assert sorted(rows) == [
        "http://gpu-1:11434",
        "http://gpu-2:11434",
        "http://llama-cpp:8080/v1",
        "http://vllm-box:8000/v1",
    ]
    assert rows["http://gpu-1:11434"].kind == "ollama" and rows["http://gpu-1:11434"].api_key == "plain-key"
    assert rows["http://vllm-box:8000/v1"].kind == "openai"
    assert rows["http://llama-cpp:8080/v1"].api_key == "llama-secret"
    assert {ep.max_concurrent_connections for ep in rows.values()} == {3}
    assert RouterSettings.load().api_key == "router-secret"


@pytest.mark.django_db
def test_it_is_idempotent(config_file: Path):
    call_command("import_config", str(config_file))
    first = list(Endpoint.objects.values_list("id", "url", "kind", "api_key", "max_concurrent_connections"))
    call_command("import_config", str(config_file))
    assert (
        list(Endpoint.objects.values_list("id", "url", "kind", "api_key", "max_concurrent_connections"))
        == first
    )


@pytest.mark.django_db
def test_it_updates_what_changed(config_file: Path):
    call_command("import_config", str(config_file))
    config_file.write_text(CONFIG.replace("max_concurrent_connections: 3", "max_concurrent_connections: 5"))
    call_command("import_config", str(config_file))
    assert set(Endpoint.objects.values_list("max_concurrent_connections", flat=True)) == {5}


@pytest.mark.django_db
def test_it_reports_a_bad_file_clearly(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [unclosed")
    with pytest.raises(CommandError, match="not valid YAML"):
        call_command("import_config", str(bad))
    with pytest.raises(CommandError, match="cannot read"):
        call_command("import_config", str(tmp_path / "missing.yaml"))
    bad.write_text("max_concurrent_connections: 0\nendpoints: []\n")
    with pytest.raises(CommandError, match="positive integer"):
        call_command("import_config", str(bad))
    assert Endpoint.objects.count() == 0


def test_it_imports_the_config_at_start_when_the_database_has_no_endpoint(config_file: Path, router):
    server = router(ROUTER_CONFIG=str(config_file), ROUTER_TEST_KEY="router-secret", LLAMA_KEY="llama-secret")
    import httpx

    from tests.conftest import wait_until

    # The imported router key protects the API from then on.
    wait_until(lambda: httpx.get(server.url + "/api/tags").status_code == 401)
    assert httpx.get(server.url + "/api/tags", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert Endpoint.objects.count() == 4


TIERED = """
endpoints:
  - url: http://gpu-1:11434
    weight: 3
  - http://gpu-2:11434
  - url: http://cpu-1:11434
    tier: 1
llama_server_endpoints:
  - url: http://paid-api:8080/v1
    tier: 2
    weight: 1
"""


@pytest.mark.django_db
def test_it_imports_tiers_and_weights_given_per_endpoint(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(TIERED)
    call_command("import_config", str(path))
    rows = {ep.url: (ep.kind, ep.tier, ep.weight) for ep in Endpoint.objects.all()}
    assert rows == {
        "http://gpu-1:11434": ("ollama", 0, 3),
        "http://gpu-2:11434": ("ollama", 0, 1),
        "http://cpu-1:11434": ("ollama", 1, 1),
        "http://paid-api:8080/v1": ("openai", 2, 1),
    }


@pytest.mark.django_db
def test_a_plain_url_keeps_the_tier_and_weight_set_in_the_admin(config_file: Path):
    call_command("import_config", str(config_file))
    Endpoint.objects.filter(url="http://gpu-1:11434").update(tier=1, weight=4)
    call_command("import_config", str(config_file))  # NOMYO's config has no tiers: nothing changes
    assert Endpoint.objects.get(url="http://gpu-1:11434").tier == 1
    assert Endpoint.objects.get(url="http://gpu-1:11434").weight == 4
    config_file.write_text(
        CONFIG.replace("  - http://gpu-1:11434\n", "  - {url: http://gpu-1:11434, tier: 0}\n")
    )
    call_command("import_config", str(config_file))  # given: it wins, the weight stays
    assert Endpoint.objects.get(url="http://gpu-1:11434").tier == 0
    assert Endpoint.objects.get(url="http://gpu-1:11434").weight == 4


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{url: http://a:11434, tier: -1}",
            r"endpoints\[0\]: tier must be a whole number from 0 to 32767, not -1",
        ),
        ("{url: http://a:11434, tier: 1.5}", r"tier must be a whole number"),
        ("{url: http://a:11434, tier: 40000}", r"tier must be a whole number"),
        ("{url: http://a:11434, weight: 0}", r"weight must be a whole number from 1 to"),
        ("{url: http://a:11434, weight: true}", r"weight must be a whole number"),
        ("{url: http://a:11434, weight: '2'}", r"weight must be a whole number"),
        (
            "{url: http://a:11434, priority: 2}",
            r"endpoints\[0\]: unknown key priority \(accepted: url, tier, weight\)",
        ),
        ("{tier: 1}", r"endpoints\[0\]: url must be given"),
        ("[http://a:11434]", r"endpoints\[0\] must be a url or a mapping"),
    ],
)
def test_it_refuses_a_bad_tier_or_weight_naming_the_entry(tmp_path: Path, entry: str, message: str):
    path = tmp_path / "config.yaml"
    path.write_text(f"endpoints:\n  - {entry}\n  - http://b:11434\n")
    with pytest.raises(CommandError, match=message):
        call_command("import_config", str(path))
    assert Endpoint.objects.count() == 0


@pytest.mark.django_db
def test_the_readme_example_imports_as_it_says(tmp_path: Path):
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### Tiers and weights in a config file", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "config.yaml"
    path.write_text(example)
    call_command("import_config", str(path))
    rows = {ep.url: (ep.tier, ep.weight) for ep in Endpoint.objects.all()}
    assert rows == {
        "http://gpu-1:11434": (0, 1),
        "http://gpu-2:11434": (0, 2),
        "http://cpu-1:11434": (1, 1),
        "http://paid-api.example/v1": (2, 1),
    }


@pytest.mark.django_db
def test_it_refuses_a_url_the_admin_would_refuse_naming_it(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text("endpoints:\n  - http://a:11434\n  - ftp://b:11434\n")
    with pytest.raises(CommandError, match="ftp://b:11434: url: The url must start with http"):
        call_command("import_config", str(path))
    assert Endpoint.objects.count() == 0  # the first one too: all or nothing


ROUTES = """
endpoints:
  - http://gpu-1:11434
aliases:
  gpt-oss: [gpt-oss:120b, gpt-oss-120b]
  fast: llama3:8b
fallbacks:
  gpt-oss: [fast, qwen:7b]
"""


@pytest.mark.django_db
def test_it_imports_aliases_and_fallback_chains_and_is_safe_to_run_again(tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(ROUTES)
    call_command("import_config", str(path))
    assert {a.name: a.target_names for a in ModelAlias.objects.all()} == {
        "gpt-oss": ["gpt-oss:120b", "gpt-oss-120b"],
        "fast": ["llama3:8b"],
    }
    assert FallbackChain.objects.get(model="gpt-oss").fallback_names == ["fast", "qwen:7b"]
    before = {a.pk: a.updated for a in ModelAlias.objects.all()}
    call_command("import_config", str(path))  # unchanged: nothing rewritten
    assert {a.pk: a.updated for a in ModelAlias.objects.all()} == before
    assert FallbackChain.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("aliases: [a, b]", "aliases must be a mapping"),
        ("aliases:\n  a: {x: 1}", "must map to a list of model names"),
        ("aliases:\n  a: [a:latest]", "cannot stand for itself"),
        ("fallbacks:\n  a: []", "at least one fallback"),
    ],
)
def test_it_refuses_bad_aliases_and_chains_with_the_models_own_message(
    tmp_path: Path, text: str, message: str
):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(CommandError, match=message):
        call_command("import_config", str(path))
    assert not ModelAlias.objects.exists() and not FallbackChain.objects.exists()

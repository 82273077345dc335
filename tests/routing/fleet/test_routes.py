"""Model aliases and fallback chains as the hot path reads them (routing/fleet/routes.py): an
alias stands for its targets in order, a chain is the name then its fallbacks, both one level
deep, every name matched in any spelling (`m` is `m:latest`)."""

from __future__ import annotations

from routing.fleet import routes


def test_it_resolves_an_alias_to_its_targets_in_order_in_any_spelling() -> None:
    table = routes.build([("gpt-oss", "gpt-oss:120b\ngpt-oss-120b")], [])
    assert table.targets("gpt-oss") == ("gpt-oss:120b", "gpt-oss-120b")
    assert table.targets("gpt-oss:latest") == ("gpt-oss:120b", "gpt-oss-120b")
    found = table.alias("gpt-oss:latest")
    assert found is not None and found.name == "gpt-oss"


def test_a_plain_model_stands_for_itself() -> None:
    table = routes.build([("big", "llama3:70b")], [])
    assert table.targets("llama3") == ("llama3",)
    assert table.alias("llama3") is None
    assert routes.NONE.targets("anything") == ("anything",)


def test_a_chain_is_the_name_then_its_fallbacks_in_order() -> None:
    table = routes.build([], [("gpt-4", "llama3:70b, big\nqwen")])
    assert table.chain("gpt-4") == ("gpt-4", "llama3:70b", "big", "qwen")
    assert table.chain("gpt-4:latest") == ("gpt-4:latest", "llama3:70b", "big", "qwen")
    assert table.chain("qwen") == ("qwen",)


def test_a_fallbacks_own_chain_is_not_followed() -> None:
    # a -> b and b -> a: each is a one-step chain, so neither loops.
    table = routes.build([], [("a", "b"), ("b", "a\nc")])
    assert table.chain("a") == ("a", "b")
    assert table.chain("b") == ("b", "a", "c")


def test_an_alias_target_is_never_resolved_again() -> None:
    table = routes.build([("x", "y"), ("y", "z")], [])
    assert table.targets("x") == ("y",)  # y is a real model name here, not the alias y


def test_duplicate_spellings_and_blank_rows_are_dropped() -> None:
    table = routes.build([("a", "m, m:latest,\n n "), ("  ", "q"), ("empty", " \n ")], [("c", "")])
    assert table.targets("a") == ("m", "n")
    assert set(table.aliases) == {"a:latest"}
    assert table.chain("c") == ("c",)
    assert routes.build([], []) is routes.NONE

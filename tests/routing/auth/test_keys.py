"""The router key (routing/auth/keys.py): a missing credential is a 401, a wrong one a 403."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routing.auth.keys import RouterKey
from routing.auth.principal import ANONYMOUS, OPERATOR
from routing.core.errors import ApiError

KEY = "sk-router-secret"
BLANK = st.text(alphabet=" \t", max_size=4)


def keyed() -> RouterKey:
    key = RouterKey()
    key.set_stored(KEY)
    return key


def status_of(key: RouterKey, authorization: str | None) -> int:
    with pytest.raises(ApiError) as caught:
        key.authenticate(authorization)
    return caught.value.status


@given(
    st.one_of(
        st.none(),
        BLANK,
        st.builds(lambda a, s, b: a + s + b, BLANK, st.sampled_from(["Bearer", "bearer", "Basic"]), BLANK),
    )
)
def test_no_credential_is_a_401(authorization: str | None) -> None:
    assert status_of(keyed(), authorization) == 401  # absent, blank, or a scheme with no token


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30))
def test_a_wrong_credential_is_a_403(token: str) -> None:
    if token != KEY:
        assert status_of(keyed(), f"Bearer {token}") == 403
    assert status_of(keyed(), f"Basic {KEY}") == 403  # the key under another scheme


def test_the_key_is_the_operator_and_no_key_lets_everyone_in(settings) -> None:
    settings.ROUTER_API_KEY = ""
    assert keyed().authenticate(f"Bearer {KEY}") is OPERATOR
    assert keyed().authenticate(f"bearer  {KEY} ") is OPERATOR
    assert RouterKey().authenticate(None) is ANONYMOUS
    assert RouterKey().authenticate("Bearer ") is ANONYMOUS

"""The operator-only guard of the fleet management routes (routing/protocols/common/decorators.py):
a client key gets a 403 naming why, the operator and an open router's anonymous caller pass."""

from __future__ import annotations

import pytest

from routing.auth.principal import ANONYMOUS, OPERATOR, Principal
from routing.core.errors import ApiError
from routing.protocols.common.decorators import refuse_unless_operator


def test_only_a_client_key_is_refused():
    refuse_unless_operator(OPERATOR, "/api/pull")
    refuse_unless_operator(ANONYMOUS, "/api/pull")  # an open router: anyone manages it
    with pytest.raises(ApiError) as refused:
        refuse_unless_operator(Principal("team-a", "key", key_id=3), "/api/delete")
    err = refused.value
    assert err.status == 403 and err.code == "operator_only"
    assert "/api/delete" in err.message and "'team-a'" in err.message and "operator key" in err.message

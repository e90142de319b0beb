"""The console's token verification with real signed tokens, the issuer's keys fetched over
real HTTP on loopback: what is trusted, what is refused and why, and how keys are refreshed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import jwt
import pytest

from orchestrator.console.auth import RemoteKeys, Role, StaticKeys, TokenVerifier
from orchestrator.errors import IssuerUnreachable, NotAllowed, NotAuthenticated
from tests.oidc_issuer import AUDIENCE, ROLE_NAMES, OidcIssuer, new_key, running_issuer


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with running_issuer() as issuer:
        yield issuer


@pytest.fixture
async def keys(issuer: OidcIssuer) -> AsyncIterator[RemoteKeys]:
    keys = RemoteKeys(issuer.url, jwks_url=None, cache_s=600, min_refresh_s=0)
    yield keys
    await keys.close()


def verifier_for(keys: RemoteKeys, issuer: OidcIssuer, roles_claim: str = "roles"
                 ) -> TokenVerifier:
    return TokenVerifier(keys, issuer=issuer.url, audience=AUDIENCE, roles_claim=roles_claim,
                         role_names=ROLE_NAMES, algorithms=["RS256", "ES256"], leeway_s=0)


async def test_a_good_token_names_its_subject_and_highest_role(
        issuer: OidcIssuer, keys: RemoteKeys) -> None:
    verifier = verifier_for(keys, issuer)

    principal = await verifier.verify(issuer.token("viewer", "operator", sub="alice"))

    assert (principal.subject, principal.role, principal.sees_accounts) == (
        "alice", Role.OPERATOR, True)
    viewer = await verifier.verify(issuer.token("viewer", sub="bob"))
    assert (viewer.role, viewer.sees_accounts) == (Role.VIEWER, False)
    # found through the discovery document, fetched once for both tokens
    assert issuer.requests == ["/.well-known/openid-configuration", "/jwks"]


@pytest.mark.parametrize(("make", "reason"), [
    (lambda i: i.token("admin", expires_in_s=-60), "expired"),
    (lambda i: i.token("admin", audience="another-service"), "not for this console"),
    (lambda i: i.token("admin", issuer="https://elsewhere.example"), "not issued by"),
    (lambda i: i.token("admin", key=new_key()), "signature does not verify"),
    (lambda i: i.token("admin", kid="k-unknown", key=new_key()), "does not publish"),
    (lambda i: i.token("admin", sub=""), "'sub'"),
    (lambda i: "not-a-jwt", "not a signed JWT"),
    (lambda i: jwt.encode({"sub": "x", "aud": AUDIENCE, "iss": i.url, "exp": 2**40,
                           "roles": ["saga-admin"]}, "k" * 32, algorithm="HS256"),
     "HS256"),
    (lambda i: jwt.encode({"sub": "x", "aud": AUDIENCE, "iss": i.url, "exp": 2**40,
                           "roles": ["saga-admin"]}, None, algorithm="none"),
     "'none'"),
])
async def test_untrusted_tokens_are_refused_saying_why(
        issuer: OidcIssuer, keys: RemoteKeys, make: object, reason: str) -> None:
    token = make(issuer)  # type: ignore[operator]

    with pytest.raises(NotAuthenticated) as refused:
        await verifier_for(keys, issuer).verify(token)

    assert reason in str(refused.value)
    assert token not in str(refused.value) or token == "not-a-jwt"


async def test_a_trusted_token_without_a_console_role_is_not_allowed(
        issuer: OidcIssuer, keys: RemoteKeys) -> None:
    with pytest.raises(NotAllowed, match="grants no console role"):
        await verifier_for(keys, issuer).verify(issuer.token("billing-admin"))


async def test_roles_from_a_nested_claim(issuer: OidcIssuer, keys: RemoteKeys) -> None:
    token = issuer.token(realm_access={"roles": ["saga-admin", "offline_access"]})

    principal = await verifier_for(keys, issuer, "realm_access.roles").verify(token)

    assert principal.role is Role.ADMIN


async def test_a_rotated_key_is_fetched_at_once_and_unknown_ones_are_rate_limited(
        issuer: OidcIssuer) -> None:
    now = [1000.0]
    keys = RemoteKeys(issuer.url, jwks_url=f"{issuer.url}/jwks", cache_s=600,
                      min_refresh_s=10, clock=lambda: now[0])
    verifier = verifier_for(keys, issuer)
    try:
        await verifier.verify(issuer.token("viewer"))
        assert keys.fetches == 1

        now[0] += 11
        rotated = issuer.rotate()
        principal = await verifier.verify(issuer.token("operator", kid=rotated))
        assert (principal.role, keys.fetches) == (Role.OPERATOR, 2)

        # made-up key ids right after: refused from the cache, the issuer not asked again
        for _ in range(3):
            with pytest.raises(NotAuthenticated, match="does not publish"):
                await verifier.verify(issuer.token("admin", kid="k-made-up", key=new_key()))
        assert keys.fetches == 2
        assert "/.well-known/openid-configuration" not in issuer.requests  # URL configured
    finally:
        await keys.close()


async def test_an_unreachable_issuer_is_its_own_error(issuer: OidcIssuer) -> None:
    keys = RemoteKeys("http://127.0.0.1:9", jwks_url=None, cache_s=600, min_refresh_s=0)
    try:
        with pytest.raises(IssuerUnreachable, match="cannot fetch"):
            await verifier_for(keys, issuer).verify(issuer.token("viewer"))
    finally:
        await keys.close()


def test_symmetric_algorithms_cannot_be_configured(issuer: OidcIssuer) -> None:
    keys = StaticKeys(issuer.jwks())
    with pytest.raises(ValueError, match="HS256"):
        TokenVerifier(keys, issuer=issuer.url, audience=AUDIENCE, roles_claim="roles",
                      role_names=ROLE_NAMES, algorithms=["HS256"], leeway_s=0)


async def test_an_issuer_that_goes_down_is_not_asked_on_every_request(
        issuer: OidcIssuer) -> None:
    now = [1000.0]
    keys = RemoteKeys(issuer.url, jwks_url=f"{issuer.url}/jwks", cache_s=60,
                      min_refresh_s=10, clock=lambda: now[0])
    verifier = verifier_for(keys, issuer)
    token = issuer.token("viewer")
    try:
        await verifier.verify(token)
        issuer.close()  # the issuer is gone

        now[0] += 61  # the cache expired: one failed fetch, the cached keys still serve
        assert (await verifier.verify(token)).role is Role.VIEWER
        now[0] += 5  # too soon to ask again: not even tried
        assert (await verifier.verify(token)).role is Role.VIEWER
        assert keys.fetches == 1

        now[0] += 60  # past twice the cache time: stale keys are dropped
        with pytest.raises(IssuerUnreachable, match="cannot fetch"):
            await verifier.verify(token)
        with pytest.raises(IssuerUnreachable):  # remembered, not fetched again at once
            await verifier.verify(token)
    finally:
        await keys.close()

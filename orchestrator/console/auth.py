"""Who is asking: OpenID Connect bearer tokens verified against the issuer's published keys.

A token is trusted when all of these hold (anything else is `NotAuthenticated`, HTTP 401):

- it is a JWS whose algorithm is one of the configured ones (never `none`, never HMAC: the
  console has no shared secret with the issuer);
- it is signed by a key of the issuer's key set (JWKS), found by the token's `kid`; a `kid`
  the cached set lacks refreshes the set at once (the issuer rotated its keys), at most once
  per `min_refresh_s`, so tokens with made-up key ids cannot make the console hammer the issuer;
- its `iss` is the configured issuer, its `aud` names the configured audience, it has not
  expired (`exp`, with a small leeway for clock skew) and it is not used before `nbf`;
- it has a non-empty `sub`: the actor recorded with every action the request takes.

Its roles come from one claim (a dotted path for nested claims, e.g. Keycloak's
`realm_access.roles`), mapped to the console's roles by configured names. Roles are ordered:
an admin may do what an operator may, an operator what a viewer may; a token granting several
gets the highest. A trusted token that grants no console role is `NotAllowed` (HTTP 403).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Protocol

import httpx
import jwt
from jwt import PyJWK, PyJWKSet

from orchestrator.errors import IssuerUnreachable, NotAllowed, NotAuthenticated

log = logging.getLogger(__name__)

# Algorithms with a public key only: an HMAC algorithm would let anyone holding the "key" (the
# JWKS is public) sign tokens.
ASYMMETRIC_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                   "ES256", "ES384", "ES512", "EdDSA"})


class Role(IntEnum):
    """What a console user may do; each role includes the ones below it."""

    VIEWER = 1  # reads, with account ids masked
    OPERATOR = 2  # reads everything and acts on one saga or dead letter at a time
    ADMIN = 3  # also acts in bulk (redrive every pending dead letter)

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def named(cls, label: str) -> Role:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown role {label!r}: viewer, operator or admin") from None


@dataclass(frozen=True)
class Principal:
    """The verified caller of one request."""

    subject: str  # the token's `sub`: the actor of every action this request takes
    role: Role
    # True when the token came from the browser session cookie, so unsafe requests must also
    # pass the cross-site request forgery check.
    from_cookie: bool = False

    @property
    def sees_accounts(self) -> bool:
        return self.role >= Role.OPERATOR


class KeySource(Protocol):
    """Where the verifier finds the public key a token names."""

    async def key(self, kid: str | None) -> PyJWK: ...


def _pick(keys: Mapping[str | None, PyJWK], kid: str | None) -> PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    # A token without `kid` is accepted only from an issuer with one signing key: with several,
    # guessing would try keys until one verifies.
    signing = list(keys.values())
    return signing[0] if len(signing) == 1 else None


def parse_key_set(document: Mapping[str, Any]) -> dict[str | None, PyJWK]:
    """A JWKS document's signing keys by `kid`. Keys for encryption are skipped, and so are
    those PyJWT cannot use (PyJWKSet drops them); which algorithms a token may use is checked
    against the token's header (`TokenVerifier`)."""
    try:
        key_set = PyJWKSet.from_dict(dict(document))
    except jwt.PyJWKSetError as error:
        raise IssuerUnreachable(f"the issuer's key set is unusable: {error}") from error
    keys: dict[str | None, PyJWK] = {}
    for key in key_set.keys:
        if key.public_key_use in (None, "sig"):
            keys[key.key_id] = key
    return keys


class StaticKeys:
    """A fixed key set: the development identity provider's own key, made at start."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self._keys = parse_key_set(document)

    async def key(self, kid: str | None) -> PyJWK:
        found = _pick(self._keys, kid)
        if found is None:
            raise NotAuthenticated(f"the token is signed with key {kid!r}, which this console's"
                                   " development identity provider did not make")
        return found


class RemoteKeys:
    """The issuer's JWKS over HTTP(S), found from its discovery document unless `jwks_url` is
    given. Cached for `cache_s`; refreshed at once for a key id it lacks (the issuer rotated);
    never fetched more often than once per `min_refresh_s`, whether the fetch worked or not, so
    neither made-up key ids nor an issuer that is down make every request wait on the issuer.
    While the issuer cannot be reached, the cached keys stay in use for up to another `cache_s`
    (refusing everyone at once over a blip is worse); after that, or with no keys yet, requests
    get `IssuerUnreachable` (HTTP 503)."""

    def __init__(self, issuer: str, *, jwks_url: str | None, cache_s: float, min_refresh_s: float,
                 client: httpx.AsyncClient | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.issuer = issuer
        self._jwks_url = jwks_url
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._client = client or httpx.AsyncClient(timeout=5.0)
        self._clock = clock
        self._keys: dict[str | None, PyJWK] | None = None
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        self._failure: IssuerUnreachable | None = None
        self._lock = asyncio.Lock()
        self.fetches = 0  # how many times the key set was fetched (for tests and logs)

    async def key(self, kid: str | None) -> PyJWK:
        if self._keys is None or self._clock() - self._fetched_at > self._cache_s:
            await self._refresh_if_due()
        found = _pick(self._keys, kid) if self._keys is not None else None
        if found is None and self._keys is not None:
            await self._refresh_if_due()  # the issuer may have rotated its keys
            found = _pick(self._keys, kid) if self._keys is not None else None
        if self._keys is None:
            raise self._failure or IssuerUnreachable(f"no key set from {self.issuer} yet")
        if found is None:
            raise NotAuthenticated(f"the token is signed with key {kid!r}, which the issuer"
                                   " does not publish")
        return found

    async def _refresh_if_due(self) -> None:
        async with self._lock:
            # Also true for requests that waited on the lock while another one fetched.
            if self._clock() - self._attempted_at < self._min_refresh_s:
                return
            self._attempted_at = self._clock()
            try:
                keys = await self._fetch()
            except IssuerUnreachable as error:
                self._failure = error
                if self._keys is not None and (
                        self._clock() - self._fetched_at <= 2 * self._cache_s):
                    log.warning("keeping the cached keys of %s: %s", self.issuer, error)
                    return
                self._keys = None
                raise
            self._keys, self._fetched_at, self._failure = keys, self._clock(), None
            self.fetches += 1

    async def _fetch(self) -> dict[str | None, PyJWK]:
        url = self._jwks_url or str((await self._get_json(
            self.issuer.rstrip("/") + "/.well-known/openid-configuration")).get("jwks_uri")
            or "")
        if not url:
            raise IssuerUnreachable(f"the discovery document of {self.issuer} names no"
                                    " jwks_uri: set SAGA_CONSOLE_OIDC_JWKS_URL")
        return parse_key_set(await self._get_json(url))

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            response = await self._client.get(url, headers={"Accept": "application/json"})
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, json.JSONDecodeError) as error:
            raise IssuerUnreachable(f"cannot fetch {url}: {error}") from error
        if not isinstance(document, dict):
            raise IssuerUnreachable(f"{url} did not answer a JSON object")
        return document

    async def close(self) -> None:
        await self._client.aclose()


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


class TokenVerifier:
    """Turns a bearer token into a `Principal`, or raises `NotAuthenticated` / `NotAllowed`."""

    def __init__(self, keys: KeySource, *, issuer: str, audience: str, roles_claim: str,
                 role_names: Mapping[str, str], algorithms: Sequence[str],
                 leeway_s: float) -> None:
        unknown = [name for name in algorithms if name not in ASYMMETRIC_ALGORITHMS]
        if unknown:
            raise ValueError(f"algorithms {unknown} are not asymmetric signature algorithms")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self._roles_claim = roles_claim
        self._roles = {claim_value: Role.named(role) for role, claim_value in role_names.items()}
        self._algorithms = list(algorithms)
        self._leeway_s = leeway_s

    async def verify(self, token: str, *, from_cookie: bool = False) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as error:
            raise NotAuthenticated("the credential is not a signed JWT") from error
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise NotAuthenticated(f"the token is signed with {algorithm!r}; this console"
                                   f" accepts {', '.join(self._algorithms)}")
        kid = header.get("kid")
        key = await self.keys.key(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token, key=key, algorithms=[algorithm], audience=self.audience,
                issuer=self.issuer, leeway=self._leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.ExpiredSignatureError as error:
            raise NotAuthenticated("the token has expired") from error
        except jwt.InvalidAudienceError as error:
            raise NotAuthenticated(f"the token is not for this console (audience"
                                   f" {self.audience!r})") from error
        except jwt.InvalidIssuerError as error:
            raise NotAuthenticated(f"the token was not issued by {self.issuer}") from error
        except jwt.InvalidSignatureError as error:
            raise NotAuthenticated("the token's signature does not verify") from error
        except jwt.MissingRequiredClaimError as error:
            raise NotAuthenticated(f"the token has no {error.claim!r} claim") from error
        except jwt.ImmatureSignatureError as error:
            raise NotAuthenticated("the token is not valid yet (nbf or iat in the future)"
                                   ) from error
        except jwt.InvalidTokenError as error:
            raise NotAuthenticated(f"the token is invalid: {error}") from error
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject.strip():
            raise NotAuthenticated("the token's 'sub' claim is empty: no actor to record")
        granted = _claim(claims, self._roles_claim)
        names = [granted] if isinstance(granted, str) else granted
        roles = [self._roles[name] for name in names or ()
                 if isinstance(name, str) and name in self._roles]
        if not roles:
            raise NotAllowed(f"the token of {subject} grants no console role: its"
                             f" {self._roles_claim!r} claim names none of"
                             f" {', '.join(sorted(self._roles))}")
        return Principal(subject=subject, role=max(roles), from_cookie=from_cookie)

"""A stand-in OpenID Connect issuer for the console's tests: an RSA key pair made in the test,
its discovery document and JWKS served over real HTTP on a loopback port, and tokens signed the
way an identity provider signs them. Only the console's side is under test; this is its peer."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

AUDIENCE = "saga-console-test"
ROLE_NAMES = {"viewer": "saga-viewer", "operator": "saga-operator", "admin": "saga-admin"}


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class OidcIssuer:
    def __init__(self) -> None:
        self.keys: dict[str, rsa.RSAPrivateKey] = {f"k-{uuid.uuid4().hex[:8]}": new_key()}
        self.published: set[str] = set(self.keys)
        self.requests: list[str] = []  # paths asked for, in order
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                issuer.requests.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    body = issuer.jwks()
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def kid(self) -> str:
        return next(iter(self.keys))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": kid,
                          "use": "sig", "alg": "RS256"}
                         for kid, key in self.keys.items() if kid in self.published]}

    def rotate(self) -> str:
        """A new signing key, published from now on (as an issuer rotates)."""
        kid = f"k-{uuid.uuid4().hex[:8]}"
        self.keys[kid] = new_key()
        self.published.add(kid)
        return kid

    def token(self, *roles: str, sub: str = "alice", audience: str = AUDIENCE,
              expires_in_s: int = 300, issuer: str | None = None, kid: str | None = None,
              key: rsa.RSAPrivateKey | None = None, **claims: Any) -> str:
        kid = kid or self.kid
        now = int(time.time())
        body = {"iss": issuer or self.url, "aud": audience, "sub": sub, "iat": now,
                "exp": now + expires_in_s, "roles": [ROLE_NAMES.get(r, r) for r in roles],
                **claims}
        return jwt.encode(body, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def running_issuer() -> Iterator[OidcIssuer]:
    issuer = OidcIssuer()
    try:
        yield issuer
    finally:
        issuer.close()

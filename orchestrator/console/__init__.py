"""The on-call console behind `saga serve`: an HTTP API (and, later, server-rendered pages)
over the operator tools of `orchestrator.ops`, every request authenticated by an OpenID
Connect token and allowed by its role (viewer, operator, admin). docs/operations/console.md."""

from orchestrator.console.app import create_app
from orchestrator.console.auth import Principal, RemoteKeys, Role, StaticKeys, TokenVerifier
from orchestrator.console.devidp import (
    DevIdentityProvider,
    dev_state_path,
    dev_token_from_state,
    request_dev_token,
)
from orchestrator.console.masking import AccountMask
from orchestrator.console.security import Console
from orchestrator.console.server import ConsoleServer, require_identity_provider

__all__ = ["AccountMask", "Console", "ConsoleServer", "DevIdentityProvider", "Principal",
           "RemoteKeys", "Role", "StaticKeys", "TokenVerifier", "create_app", "dev_state_path",
           "dev_token_from_state", "request_dev_token", "require_identity_provider"]

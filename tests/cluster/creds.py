"""Throwaway operator-mode NATS credentials: an operator, an account and a user, their JWTs
signed here with ``nkeys`` (as ``nsc`` would), the server configuration that trusts the
operator (its account preloaded), and the user's ``.creds`` file (its JWT and NKey seed)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys

_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


@dataclass(frozen=True)
class Creds:
    server_config: str  # to add to a nats-server configuration
    creds_file: Path
    seed: str  # the user's, to check it never shows


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _keypair(prefix: int) -> Any:
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _jwt(claims: dict[str, Any], signer: Any) -> str:
    claims = {"iat": int(time.time()), **claims}
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).decode().rstrip("=")
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(signer.sign(f'{head}.{body}'.encode()))}"


def make_creds(directory: Path) -> Creds:
    operator = _keypair(nkeys.PREFIX_BYTE_OPERATOR)
    account = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    system = _keypair(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    user = _keypair(nkeys.PREFIX_BYTE_USER)
    op, acc, sys_, usr = (k.public_key.decode() for k in (operator, account, system, user))
    nats = {"type": "operator", "version": 2}
    operator_jwt = _jwt({"iss": op, "sub": op, "name": "op", "nats": nats}, operator)
    nats = {"limits": _UNLIMITED, "type": "account", "version": 2}
    account_jwt = _jwt({"iss": op, "sub": acc, "name": "acc", "nats": nats}, operator)
    nats = {"type": "account", "version": 2}
    system_jwt = _jwt({"iss": op, "sub": sys_, "name": "SYS", "nats": nats}, operator)
    nats = {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user"}
    nats["version"] = 2
    user_jwt = _jwt({"iss": acc, "sub": usr, "name": "u", "nats": nats}, account)
    seed = user.seed.decode()
    directory.mkdir(parents=True, exist_ok=True)
    creds_file = directory / "user.creds"
    creds_file.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
    config = (
        f"operator: {operator_jwt}\nsystem_account: {sys_}\nresolver: MEMORY\n"
        f"resolver_preload: {{\n  {acc}: {account_jwt}\n  {sys_}: {system_jwt}\n}}\n"
    )
    return Creds(server_config=config, creds_file=creds_file, seed=seed)

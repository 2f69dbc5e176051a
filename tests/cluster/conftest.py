"""Fixtures for the cluster, permission and TLS tests: throwaway TLS files and a nats-server
running the generated per-actor accounts (``vapora.deploy``) with TLS, verification on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.connection import Client, ConnectOptions, connect
from actors.server import EmbeddedNats
from tests.cluster.certs import TlsFiles, make_tls_files
from vapora.deploy import USERS, ServerTls, render_accounts, render_tls

#: A second client user, as ``python -m vapora.deploy --client billing`` adds one.
CLIENTS = ("billing",)
PASSWORDS = {user: f"pw-{user}-0123456789" for user in (*USERS, *CLIENTS)}


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def secured_config(tls: TlsFiles) -> str:
    """The generated accounts with literal test passwords, and client TLS with verification."""
    server_tls = ServerTls(
        cert_file=str(tls.server_cert), key_file=str(tls.server_key), ca_file=str(tls.ca)
    )
    return render_accounts(PASSWORDS, clients=CLIENTS) + render_tls(server_tls)


@pytest.fixture(scope="module")
async def secured_server(
    tmp_path_factory: pytest.TempPathFactory, tls_files: TlsFiles
) -> AsyncIterator[EmbeddedNats]:
    async with EmbeddedNats(
        tmp_path_factory.mktemp("secured"), extra_config=secured_config(tls_files)
    ) as server:
        yield server


def options_for(
    url: str,
    user: str,
    tls: TlsFiles,
    *,
    password: str | None = None,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    initial_deadline: float = 5.0,
) -> ConnectOptions:
    """How ``user`` connects: its password, our CA, the deployment's client certificate."""
    return ConnectOptions.from_url(
        url,
        name=f"test-{user}",
        user=user,
        password=PASSWORDS[user] if password is None else password,
        tls_ca_file=str(ca or tls.ca),
        tls_cert_file=str(cert or tls.client_cert),
        tls_key_file=str(key or tls.client_key),
        connect_timeout=2.0,
        initial_deadline=initial_deadline,
    )


async def connect_as(url: str, user: str, tls: TlsFiles, **kw: object) -> Client:
    return await connect(options_for(url, user, tls, **kw))  # type: ignore[arg-type]

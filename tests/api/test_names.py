"""SMTP user names: unique across all owners under concurrency, and never issued twice."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from sqlalchemy import Connection

from poweremail.keyring import Keyring
from poweremail.store import smtp_users
from poweremail.store.owners import authenticate_owner
from tests.support import Owner, ServerProcess, run, store_write


async def _add_concurrently(server: ServerProcess, owners: list[Owner], count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        return await asyncio.gather(
            *(
                client.post(
                    "/settings/addSmtp", json=owners[i % len(owners)].creds(total_limit=5, hourly_limit=5)
                )
                for i in range(count)
            )
        )


def test_fifty_concurrent_adds_give_fifty_distinct_names(
    server: ServerProcess, owner: Owner, other_owner: Owner
) -> None:
    responses = run(_add_concurrently(server, [owner, other_owner], 50))
    assert [r.status_code for r in responses] == [200] * 50
    names = [r.json()["smtp_user_name"] for r in responses]
    assert len(set(names)) == 50
    listed = server.post("listSmtp", owner.creds()).json()["smtp_list"]
    listed += server.post("listSmtp", other_owner.creds()).json()["smtp_list"]
    assert sorted(e["smtp_user_name"] for e in listed) == sorted(names)


def test_a_deleted_name_is_never_issued_again(
    server: ServerProcess, owner: Owner, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted = server.post("addSmtp", owner.creds(total_limit=5, hourly_limit=5)).json()["smtp_user_name"]
    assert server.post("deleteSmtp", owner.creds(smtp_user_name=deleted)).status_code == 200

    # Make the random source draw the deleted name first: the store must refuse it and draw again.
    draws = iter([deleted, deleted, "smtp1999999999"])
    monkeypatch.setattr(smtp_users, "new_smtp_user_name", lambda: next(draws))

    keyring = Keyring.load(server.data_dir / "secret.key")

    def add_in_process(conn: Connection) -> str:
        owner_pk = authenticate_owner(conn, owner_id=owner.owner_id, token=owner.token)
        assert owner_pk is not None
        name, _ = smtp_users.create_smtp_user(
            conn, owner_pk=owner_pk, keyring=keyring, total_limit=1, hourly_limit=1
        )
        return name

    assert store_write(server.database_url, add_in_process) == "smtp1999999999"
    assert next(draws, None) is None  # both collisions were really tried

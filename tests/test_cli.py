"""The ``poweremail`` command (SPEC §6): its outputs, flags, environment and one-line failures."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import Owner, ServerProcess, clean_env, free_port, poweremail


def _one_line_failure(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("poweremail")
    return lines[0]


def test_owner_create_prints_owner_id_and_a_256_bit_token(database_url: str, tmp_path: Path) -> None:
    result = poweremail(
        "owner", "create", "--name", "Acme", "--data-dir", str(tmp_path), "--database-url", database_url
    )
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert set(created) == {"owner_id", "token"}
    assert len(created["token"]) >= 43  # 32 bytes in URL-safe base64

    listed = poweremail("owner", "list", "--data-dir", str(tmp_path), "--database-url", database_url)
    assert listed.returncode == 0, listed.stderr
    [entry] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert entry["owner_id"] == created["owner_id"] and entry["name"] == "Acme" and entry["smtp_users"] == 0
    assert created["token"] not in listed.stdout + listed.stderr


def test_rotate_token_replaces_the_old_token(server: ServerProcess, owner: Owner) -> None:
    flags = ["--data-dir", str(server.data_dir), "--database-url", server.database_url]
    result = poweremail("owner", "rotate-token", owner.owner_id, *flags)
    assert result.returncode == 0, result.stderr
    new_token = json.loads(result.stdout)["token"]
    assert server.post("listSmtp", owner.creds()).status_code == 401
    assert server.post("listSmtp", {"owner_id": owner.owner_id, "token": new_token}).status_code == 200
    assert "no owner" in _one_line_failure(poweremail("owner", "rotate-token", "nobody", *flags))


def test_environment_variables_configure_and_flags_win(tmp_path: Path) -> None:
    env = clean_env(POWEREMAIL_DATA_DIR=str(tmp_path / "from-env"))
    assert poweremail("owner", "create", env=env).returncode == 0
    assert (tmp_path / "from-env" / "poweremail.sqlite3").exists()
    assert poweremail("owner", "create", "--data-dir", str(tmp_path / "from-flag"), env=env).returncode == 0
    assert (tmp_path / "from-flag" / "poweremail.sqlite3").exists()
    listed = poweremail("owner", "list", env=env)
    assert len(listed.stdout.splitlines()) == 1  # the flag's owner went to the flag's directory


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--bogus"], {}, "unrecognized arguments: --bogus"),
        (["frobnicate"], {}, "invalid choice"),
        (["owner"], {}, "required"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    assert expected in _one_line_failure(poweremail(*args, env=clean_env(**env)), code=2)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"POWEREMAIL_API_PORT": "abc"}, "bad value for --api-port (or POWEREMAIL_API_PORT)"),
        ({"POWEREMAIL_API_PORT": "99999"}, "less than or equal to 65535"),
        ({"POWEREMAIL_ROLES": "api,mail"}, "bad value for --roles"),
        ({"POWEREMAIL_LOG_LEVEL": "loud"}, "bad value for --log-level"),
    ],
)
def test_bad_environment_values_are_one_line(tmp_path: Path, env: dict[str, str], expected: str) -> None:
    result = poweremail("serve", "--data-dir", str(tmp_path), env=clean_env(**env))
    assert expected in _one_line_failure(result)
    # The same value given as a flag fails the same way.
    [(name, value)] = env.items()
    flag = "--" + name.removeprefix("POWEREMAIL_").lower().replace("_", "-")
    assert expected in _one_line_failure(poweremail("serve", "--data-dir", str(tmp_path), flag, value))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql://postgres@127.0.0.1:1/nothing",
            "cannot open the database postgresql://postgres@127.0.0.1:1/nothing",
        ),
        ("postgresql://postgres:hunter2@127.0.0.1:1/x", "postgresql://postgres:***@127.0.0.1:1/x"),
        ("mysql://localhost/x", "unsupported database 'mysql'"),
        ("not a url", "not a database URL"),
    ],
)
def test_an_unusable_database_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    for command in (["owner", "create"], ["serve", "--api-port", str(free_port())]):
        line = _one_line_failure(poweremail(*command, "--data-dir", str(tmp_path), "--database-url", url))
        assert expected in line
        assert "hunter2" not in line


def test_a_busy_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line_failure(poweremail("serve", "--data-dir", str(tmp_path), "--api-port", str(port)))
    assert f"cannot listen for the API on 127.0.0.1:{port}" in line
    assert "in use" in line


def test_serve_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    process = ServerProcess(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        log_path=tmp_path / "serve.log",
    ).start()
    assert httpx.get(f"{process.base_url}/docs").status_code == 200
    assert process.stop() == 0
    assert "Traceback" not in process.log()


def test_version_and_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poweremail", "--version"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and result.stdout.startswith("poweremail ")

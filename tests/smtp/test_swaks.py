"""An independent SMTP client, swaks (Debian's package), logs in and sends over STARTTLS."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.smtp.helpers import add_smtp_user, usage
from tests.support import Owner, ServerProcess


@pytest.fixture
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("swaks is not installed; scripts/test installs it with apt-get", pytrace=False)
        pytest.skip("swaks is not installed (apt-get install swaks)")
    return path


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_swaks_sends_over_starttls(server: ServerProcess, owner: Owner, swaks: str, mechanism: str) -> None:
    user = add_smtp_user(server, owner)
    result = subprocess.run(
        [
            swaks,
            "--server", f"127.0.0.1:{server.smtp_port}",
            "--tls",  # STARTTLS, and fail if it cannot be negotiated
            "--auth", mechanism,
            "--auth-user", user.name,
            "--auth-password", user.password,
            "--from", "app@example.com",
            "--to", "someone@example.net,other@example.org",
            "--header", "Subject: from swaks",
            "--body", "Sent by swaks.",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "<-  220 Ready to start TLS" in result.stdout and "TLS started" in result.stdout
    assert "<~  235 2.7.0 Authentication successful" in result.stdout
    assert "<~  250 2.0.0 Ok: queued as " in result.stdout
    assert usage(server, owner, user) == (2, 2)

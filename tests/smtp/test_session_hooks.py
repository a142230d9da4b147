"""SubmissionSMTP and SubmissionHandler answer ``dir()`` with their hook names only, so aiosmtpd's
per-connection scan for auth_/smtp_/handle_ methods is cheap. It must still find exactly what a
full scan finds: every command, every AUTH mechanism (ours, not aiosmtpd's built-ins) and every hook.
"""

from __future__ import annotations

import asyncio
import inspect
import warnings

from poweremail.smtp.handler import SubmissionHandler
from poweremail.smtp.protocol import ConnectionPolicy, SubmissionSMTP


def _full_scan(obj: object, prefix: str) -> dict[str, object]:
    """What aiosmtpd would find without our __dir__: every attribute of the object, by name."""
    names = object.__dir__(obj)
    return {name: inspect.getattr_static(obj, name) for name in names if name.startswith(prefix)}


def test_a_session_finds_every_command_mechanism_and_hook_a_full_scan_finds() -> None:
    handler = SubmissionHandler.__new__(SubmissionHandler)
    policy = ConnectionPolicy(
        max_connections_per_address=1, session_timeout=1.0, plaintext_auth_on_loopback=True, bulk_data=None
    )

    async def build() -> SubmissionSMTP:
        # In a running loop, which asyncio.run closes after: outside one, aiosmtpd would make an
        # event loop of its own that nobody closes (its socketpair then leaks into a later test).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # aiosmtpd warns about AUTH without TLS: not what is tested
            return SubmissionSMTP(
                handler, policy=policy, implicit_tls=False, auth_required=True, auth_require_tls=True
            )

    session = asyncio.run(build())

    commands = _full_scan(session, "smtp_")
    assert set(session._smtp_methods) == {name.removeprefix("smtp_") for name in commands}
    assert {"AUTH", "DATA", "EHLO", "MAIL", "RCPT", "STARTTLS"} <= set(session._smtp_methods)
    for name, method in session._smtp_methods.items():
        assert method.__self__ is session and method.__func__ is getattr(SubmissionSMTP, f"smtp_{name}")

    hooks = _full_scan(handler, "handle_")
    assert set(session._handle_hooks) == {name.removeprefix("handle_") for name in hooks}
    assert {"DATA", "EHLO", "MAIL", "RCPT"} <= set(session._handle_hooks)

    # The handler's async AUTH PLAIN/LOGIN replace aiosmtpd's synchronous built-ins (SPEC §4).
    mechanisms = set(_full_scan(handler, "auth_")) | set(_full_scan(session, "auth_"))
    assert (
        set(session._auth_methods)
        == {name.removeprefix("auth_") for name in mechanisms}
        == {"PLAIN", "LOGIN"}
    )
    for mechanism in session._auth_methods.values():
        assert not mechanism.is_builtin and mechanism.method.__self__ is handler

"""A raw SMTP connection for tests that must send exact bytes (smuggling, pipelining)."""

from __future__ import annotations

import base64
import socket
import ssl


class RawSMTP:
    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 20) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self._buffer = b""
        self.greeting = self.reply()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawSMTP:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> str:
        """One whole reply (all lines of a multi-line one), as text; "" if the server closed."""
        lines = []
        while True:
            while b"\r\n" not in self._buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return "\n".join(lines)
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return "\n".join(lines)

    def command(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def login(self, name: str, password: str) -> str:
        self.command("EHLO client.example")
        token = base64.b64encode(f"\0{name}\0{password}".encode()).decode()
        return self.command(f"AUTH PLAIN {token}")

    def is_closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

"""The receiver PowerEmail delivers to in a benchmark: Postfix's smtp-sink (C, counts what it gets),
installed on first use, or bench/bare_smtp.py. Shared by bench/delivery.py and bench/smtp.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from _servers import BARE_PASSWORD, BARE_SCRIPT, BARE_USER, free_port

SMTP_SINK_SETUP = (
    "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections && "
    "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postfix"
)


def find_smtp_sink() -> str | None:
    return shutil.which("smtp-sink") or next(
        (path for path in ("/usr/sbin/smtp-sink", "/usr/bin/smtp-sink") if os.access(path, os.X_OK)), None
    )


def install_smtp_sink() -> str | None:
    """Install Debian's postfix for its smtp-sink, configured to start no daemon; None if that fails."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    print(f"installing smtp-sink: {SMTP_SINK_SETUP}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"]
    steps = [
        (["debconf-set-selections"], "postfix postfix/main_mailer_type select No configuration\n"),
        (install, None),
    ]
    for command, stdin in steps:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, env=env)
        if done.returncode != 0 and command is install:
            # A fresh machine may have no package lists yet.
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            print(f"  {command[0]} failed: {done.stderr.strip()[-500:]}", flush=True)
            return None
    return find_smtp_sink()


class Receiver:
    """The relay PowerEmail delivers to: smtp-sink (which counts) or bench/bare_smtp.py (which does not)."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind = kind
        self.port = free_port()
        self.log = work / f"receiver-{kind}.log"
        if kind == "smtp-sink":
            sink = find_smtp_sink()
            assert sink is not None
            # -c: running counters on stdout ("sess=N quit=N mesg=N", one per event, ending in CR);
            # -u: the user to drop to, required when started as root; 1000: the listen backlog.
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            self.command = [sink, "-c", *user, f"127.0.0.1:{self.port}", "1000"]
            self.relay_login: list[str] = []
        else:
            self.command = [sys.executable, str(BARE_SCRIPT), "--port", str(self.port)]
            # bare_smtp.py requires AUTH; a login over plaintext is allowed toward a loopback relay.
            self.relay_login = ["--relay-user", BARE_USER, "--relay-password", BARE_PASSWORD]
        self.pid = 0

    def count(self) -> int | None:
        """Messages received so far (smtp-sink's last ``mesg=`` counter); None for bare_smtp.py."""
        if self.kind != "smtp-sink":
            return None
        with self.log.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - 200))
            counters = re.findall(rb"mesg=(\d+)", log.read())
        return int(counters[-1]) if counters else 0

    def describe(self) -> str:
        if self.kind == "smtp-sink":
            flags = " ".join(self.command[1:]).replace(str(self.port), "PORT")
            return f"Postfix's `smtp-sink {flags}` ({postfix_version()})"
        return "bench/bare_smtp.py (smtp-sink was not available: Python, no count of its own)"


def postfix_version() -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postfix"], capture_output=True, text=True)
    return f"postfix {done.stdout.strip()}" if done.returncode == 0 else "postfix, version unknown"

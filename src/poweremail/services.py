"""What every role of a node shares: the settings, the database and the keyring."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from poweremail.config import Settings
from poweremail.keyring import Keyring
from poweremail.store.database import Database
from poweremail.store.submissions import SenderStates, SubmissionWriter


class DataDirError(Exception):
    pass


@dataclass
class Services:
    settings: Settings
    database: Database
    keyring: Keyring
    # Set when this node queues mail (a submission, a bounce): its delivery worker looks at once
    # instead of at its next poll.
    mail_queued: asyncio.Event = field(default_factory=asyncio.Event)
    # Senders' states for the checks at MAIL; whatever changes an SMTP user or an owner calls
    # senders.forget_all() once it has committed.
    senders: SenderStates = field(default_factory=SenderStates)
    # Accepted mail goes to the store through this, in batches (group commit).
    submissions: SubmissionWriter = field(init=False)

    def __post_init__(self) -> None:
        self.submissions = SubmissionWriter(self.database, self.senders)

    async def close(self) -> None:
        await self.database.close()


async def open_services(settings: Settings) -> Services:
    """Create the data directory and key if missing, open the database and migrate it.

    Raises ``DataDirError``, ``KeyringError``, ``DatabaseUrlError`` or ``DatabaseUnavailableError``,
    each with a one-line message for the CLI to print.
    """
    try:
        # 0700: the directory holds the key that decrypts every SMTP password.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirError(f"cannot create the data directory {settings.data_dir}: {exc.strerror}") from None
    keyring = Keyring.load_or_create(settings.effective_secret_key_file)
    database = Database(settings.effective_database_url)
    try:
        await database.migrate()
    except BaseException:
        await database.close()
        raise
    return Services(settings=settings, database=database, keyring=keyring)

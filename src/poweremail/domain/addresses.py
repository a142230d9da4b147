"""Mail addresses as the queue and the delivery worker see them."""

from __future__ import annotations


def address_domain(address: str) -> str:
    """The domain of ``local@domain``, lower case (RFC 5321 §2.4: domains are case-insensitive).

    The last ``@`` separates them: a quoted local part may itself contain one.
    """
    return address.rpartition("@")[2].lower()


def needs_smtputf8(*addresses: str) -> bool:
    """An envelope with a non-ASCII address can only go to a server offering SMTPUTF8 (RFC 6531)."""
    return any(not address.isascii() for address in addresses)

"""PowerEmail: a self-hostable email-sending service.

Owners create SMTP users with sending limits through the management API (``poweremail.api``);
applications log in to the SMTP submission server with those credentials; accepted mail is
stored durably and delivered. ``poweremail serve`` runs every role in one process.
"""

__version__ = "0.1.0"

"""The management API: the document's ``/settings/*`` calls (SPEC §2)."""

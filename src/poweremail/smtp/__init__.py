"""The SMTP submission server (SPEC §4): applications log in with SMTP users and hand us mail."""

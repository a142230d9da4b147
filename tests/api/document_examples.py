"""The document's four example requests, byte for byte as printed (trailing commas included).

Source: shared/seed/000_dc1e0a42b6f6cdd3.txt ("Example Request JSON" of each call).
"""

ADD_SMTP = """{
"owner_id": "example id",
"token": "example token",
"total_limit": 100,
"hourly_limit": 10,
}"""

EDIT_SMTP = """{
"owner_id": "example id",
"token": "example token",
"smtp_user_name": "smtp12345",
"total_limit": 80,
"hourly_limit": 15,
"status": "Disable",
}"""

RESET_SMTP_PASSWORD = """{
"owner_id": "example id",
"token": "example token",
"smtp_user_name": "smtp12345",
}"""

LIST_SMTP = """{
"owner_id": "example id",
"token": "example token",
}"""

"""``/openapi.json`` and ``/docs`` describe every call with the document's examples."""

from __future__ import annotations

import httpx

from tests.support import ServerProcess

CALLS = ["addSmtp", "editSmtp", "resetSmtpPassword", "listSmtp", "deleteSmtp", "listMessages"]


def test_openapi_describes_every_call(server: ServerProcess) -> None:
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    assert sorted(spec["paths"]) == sorted(f"/settings/{call}" for call in CALLS)
    for call in CALLS:
        operation = spec["paths"][f"/settings/{call}"]["post"]
        content = operation["requestBody"]["content"]
        assert set(content) == {"application/json", "application/x-www-form-urlencoded"}
        schema = content["application/json"]["schema"]
        assert schema["additionalProperties"] is False
        assert {"owner_id", "token"} <= set(schema["required"])
        assert content["application/json"]["example"]["owner_id"] == "example id"
        assert set(operation["responses"]) == {"200", "400", "401", "500"}
    add = spec["paths"]["/settings/addSmtp"]["post"]["requestBody"]["content"]["application/json"]
    assert add["example"] == {
        "owner_id": "example id",
        "token": "example token",
        "total_limit": 100,
        "hourly_limit": 10,
    }


def test_docs_page_is_served(server: ServerProcess) -> None:
    response = httpx.get(f"{server.base_url}/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()

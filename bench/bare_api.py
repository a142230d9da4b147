"""The "bare endpoint": the same web stack as ``poweremail serve --roles api``, doing no work.

bench/api.py measures it next to the real calls, so the ratio of the two says how much of a call's
cost is PowerEmail's own (validation, the database, decryption) and how much is the stack
(uvicorn, httptools, Starlette/FastAPI routing), which no change to PowerEmail can remove.

Run: ``python bench/bare_api.py --port 8099``.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

# Built once: the endpoint should cost as little as an endpoint can.
_ANSWER = json.dumps({"status": "success", "message": "ok"}, separators=(",", ":")).encode()

app = FastAPI(title="bare endpoint")


@app.post("/bare")
async def bare(request: Request) -> Response:
    # Read and parse the body as a real call must, so the comparison is not flattered by skipping it.
    json.loads(await request.body())
    return Response(_ANSWER, media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    # The same options as poweremail.node.run_node, so only the endpoint differs. loop="asyncio"
    # because the node runs under asyncio.run (the standard loop); uvicorn's default "auto" would
    # switch to uvloop wherever it is installed and flatter the bare side.
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        http="httptools",
        loop="asyncio",
    )


if __name__ == "__main__":
    main()

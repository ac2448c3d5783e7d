"""`python -m service.healthcheck`: exit 0 when the API on this host answers its own `GET /health`.

The API image's and docker-compose.yml's healthcheck: Python's standard library only (no curl in
the image), the port from `XATL_PORT` (as `xatl serve` reads it), a short timeout, and one line on
stderr saying what failed.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request


def check(url: str, timeout: float = 3.0) -> str | None:
    """None when `url` answers 200 with `{"status": "ok"}`, else what went wrong."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as error:
        return f"{url}: {error}"
    if not isinstance(body, dict) or body.get("status") != "ok":
        return f"{url}: answered {body}"
    return None


def main() -> int:
    port = os.environ.get("XATL_PORT", "8000")
    problem = check(f"http://127.0.0.1:{port}/health")
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

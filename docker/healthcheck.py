#!/usr/bin/env python3
"""Container health check: exit 0 when the server's /health answers 200, 1 otherwise.

Used by the images' HEALTHCHECK and by docker/compose.yaml. Standard library only (no curl in the
image). The URL is T2_HEALTHCHECK_URL if set, else http://127.0.0.1:$T2_PORT/health (the server
listens on 0.0.0.0 inside the container, so loopback reaches it). /health answers 503 while the
engine is not ready or after an engine fault, which urllib raises as an error.
"""

import os
import sys
import urllib.request

url = os.environ.get("T2_HEALTHCHECK_URL") or f"http://127.0.0.1:{os.environ.get('T2_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=float(os.environ.get("T2_HEALTHCHECK_TIMEOUT", "4"))) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # connection refused while starting, HTTP 503, timeout
    print(f"unhealthy: {url}: {e}", file=sys.stderr)
    sys.exit(1)

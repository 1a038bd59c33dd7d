#!/usr/bin/env bash
# The GraphQL over HTTP audit (graphql-http's auditServer) against a local server: a fresh
# SQLite database in a temporary directory, an API key made with the CLI, `serve` on a free
# port. Exits non-zero when any MUST fails. Needs Node.js 18+ and npm (installs the pinned
# graphql-http from package-lock.json on first use).
#   scripts/audit.sh                    # uses .venv/bin/consumers-graphql, else the one on PATH
#   CONSUMERS_CLI=/path/to/consumers-graphql scripts/audit.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"

cli="${CONSUMERS_CLI:-}"
if [[ -z "$cli" ]]; then
  if [[ -x "$root/.venv/bin/consumers-graphql" ]]; then
    cli="$root/.venv/bin/consumers-graphql"
  else
    cli="$(command -v consumers-graphql || true)"
  fi
fi
if [[ -z "$cli" ]]; then
  echo "consumers-graphql not found: install the project (pip install -e .) or set CONSUMERS_CLI" >&2
  exit 2
fi
python="$(dirname "$cli")/python"
[[ -x "$python" ]] || python=python3

if [[ ! -d "$here/node_modules/graphql-http" ]]; then
  (cd "$here" && npm ci --no-audit --no-fund --silent)
fi

work="$(mktemp -d)"
server=""
cleanup() {
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CONSUMERS_DATABASE_URL="sqlite+aiosqlite:///$work/audit.db"
export CONSUMERS_HOST=127.0.0.1
export CONSUMERS_PORT="$port"
export CONSUMERS_LOG_LEVEL=warning
# The suite's variables probes query `__type`, which production mode (no introspection) refuses.
export CONSUMERS_ENV=development

"$cli" migrate >/dev/null
key="$("$cli" keys create --name graphql-http-audit | grep -oE 'sk_(live|test)_[A-Za-z0-9]+' | head -n 1)"
[[ -n "$key" ]] || { echo "could not create an API key" >&2; exit 2; }

"$cli" serve --port "$port" >"$work/server.log" 2>&1 &
server=$!
url="http://127.0.0.1:$port"
for _ in $(seq 100); do
  if "$python" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1], timeout=1)" \
      "$url/healthz" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server" 2>/dev/null; then
    echo "the server did not start:" >&2; cat "$work/server.log" >&2; exit 2
  fi
  sleep 0.2
done

echo "== graphql-http $(node -p "require('$here/node_modules/graphql-http/package.json').version") audit of $url/graphql"
status=0
CONSUMERS_API_KEY="$key" node "$here/graphql-http-audit.mjs" "$url/graphql" || status=$?
if [[ $status -ne 0 ]]; then
  echo "-- server log" >&2; tail -n 50 "$work/server.log" >&2
fi
exit $status

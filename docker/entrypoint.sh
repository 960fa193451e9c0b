#!/bin/sh
# The container's entrypoint: hands the bearer token to the server as a
# tokens file that only the server's user can read, and takes it out of the
# environment, which the kernels would otherwise inherit.
#   MCP_AUTH_TOKEN        the token itself, or
#   MCP_AUTH_TOKEN_FILE   a file holding it (a mounted secret; first line)
# MCP_TOKENS_FILE (`NAME TOKEN` lines, several principals) is passed through.
# Without any of them the server refuses to listen on 0.0.0.0, as it should.
set -eu

die() {
  echo "mcp-python-interpreter entrypoint: $*" >&2
  exit 64
}

token=""
if [ -n "${MCP_AUTH_TOKEN_FILE:-}" ]; then
  [ -z "${MCP_AUTH_TOKEN:-}" ] || die "set MCP_AUTH_TOKEN or MCP_AUTH_TOKEN_FILE, not both"
  [ -r "$MCP_AUTH_TOKEN_FILE" ] || die "cannot read MCP_AUTH_TOKEN_FILE=$MCP_AUTH_TOKEN_FILE (is it mounted, and readable by uid $(id -u)?)"
  token=$(head -n 1 "$MCP_AUTH_TOKEN_FILE" | tr -d '\r\n')
  [ -n "$token" ] || die "$MCP_AUTH_TOKEN_FILE is empty"
elif [ -n "${MCP_AUTH_TOKEN:-}" ]; then
  token=$MCP_AUTH_TOKEN
fi
unset MCP_AUTH_TOKEN MCP_AUTH_TOKEN_FILE

if [ -n "$token" ]; then
  [ -z "${MCP_TOKENS_FILE:-}" ] || die "set a token (MCP_AUTH_TOKEN or MCP_AUTH_TOKEN_FILE) or MCP_TOKENS_FILE, not both"
  umask 077
  dir=$(mktemp -d)
  # The principal `default`, as for --auth-token: sessions stay the caller's
  # whichever way the token arrives.
  printf 'default %s\n' "$token" >"$dir/tokens"
  MCP_TOKENS_FILE="$dir/tokens"
  export MCP_TOKENS_FILE
fi
unset token
if [ -z "${MCP_TOKENS_FILE:-}" ] && [ $# -eq 0 ]; then
  echo "mcp-python-interpreter entrypoint: no token given: pass -e MCP_AUTH_TOKEN=... (16+ characters) or mount one and set MCP_AUTH_TOKEN_FILE" >&2
fi

exec /usr/local/bin/mcp-python-interpreter "$@"

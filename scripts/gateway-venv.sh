# Sourced by scripts: makes target/gateway-venv (Jupyter Kernel Gateway and
# Jupyter Server, pinned in tests/gateway-requirements.txt) for the
# remote-kernel tests, and exports MCP_TEST_GATEWAY_PYTHON.
gw_venv=target/gateway-venv
if [ ! -x "$gw_venv/bin/python" ] || ! cmp -s tests/gateway-requirements.txt "$gw_venv/requirements.txt"; then
  rm -rf "$gw_venv"
  python3 -m venv "$gw_venv"
  "$gw_venv/bin/pip" install --quiet --disable-pip-version-check -r tests/gateway-requirements.txt
  cp tests/gateway-requirements.txt "$gw_venv/requirements.txt"
fi
export MCP_TEST_GATEWAY_PYTHON="$PWD/$gw_venv/bin/python"

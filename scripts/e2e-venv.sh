# Sourced by scripts: makes target/e2e-venv (the official Python MCP SDK and
# pytest, pinned in tests/e2e/requirements.txt) and sets E2E_PYTHON.
venv=target/e2e-venv
if [ ! -x "$venv/bin/python" ] || ! cmp -s tests/e2e/requirements.txt "$venv/requirements.txt"; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
  cp tests/e2e/requirements.txt "$venv/requirements.txt"
fi
E2E_PYTHON="$PWD/$venv/bin/python"

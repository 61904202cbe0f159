#!/usr/bin/env bash
# Install the web3 example/test tooling (anvil + solc-js) from the npm registry.
#
# Usage: examples/web3/tools.sh [DEST]
#   DEST defaults to $QDWORKER_WEB3_TOOLS, else <project root>/.tools/web3.
# Idempotent: does nothing if the pinned versions are already installed.
# Prints the absolute path of the anvil binary on the last line of stdout.
set -euo pipefail

ANVIL_VERSION="${ANVIL_VERSION:-1.7.1}"
SOLC_VERSION="${SOLC_VERSION:-0.8.28}"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
dest="${1:-${QDWORKER_WEB3_TOOLS:-$root/.tools/web3}}"

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64|Linux-amd64) anvil_pkg="@foundry-rs/anvil-linux-amd64" ;;
  Linux-aarch64|Linux-arm64) anvil_pkg="@foundry-rs/anvil-linux-arm64" ;;
  Darwin-x86_64) anvil_pkg="@foundry-rs/anvil-darwin-amd64" ;;
  Darwin-arm64) anvil_pkg="@foundry-rs/anvil-darwin-arm64" ;;
  *) echo "tools.sh: unsupported platform $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

command -v npm >/dev/null || { echo "tools.sh: npm not found (apt-get install -y nodejs npm)" >&2; exit 1; }

mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
# Keep the folder out of git without touching the project's .gitignore.
[ -f "$dest/.gitignore" ] || printf '*\n' > "$dest/.gitignore"

anvil_bin="$dest/node_modules/$anvil_pkg/bin/anvil"
stamp="$dest/.installed"
want="$anvil_pkg@$ANVIL_VERSION solc@$SOLC_VERSION"

if [ ! -x "$anvil_bin" ] || [ ! -f "$dest/node_modules/solc/package.json" ] \
   || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  [ -f "$dest/package.json" ] || printf '{"name":"qdworker-web3-tools","private":true}\n' > "$dest/package.json"
  echo "tools.sh: installing $want into $dest" >&2
  npm install --prefix "$dest" --no-audit --no-fund --no-save --loglevel=error \
    "$anvil_pkg@$ANVIL_VERSION" "solc@$SOLC_VERSION" >&2
  if [ ! -x "$anvil_bin" ]; then
    found="$(find "$dest/node_modules/$anvil_pkg" -type f -name anvil | head -n1)"
    [ -n "$found" ] || { echo "tools.sh: anvil binary not found in $anvil_pkg" >&2; exit 1; }
    chmod +x "$found"
    anvil_bin="$found"
  fi
  echo "$want" > "$stamp"
fi

"$anvil_bin" --version >&2
echo "$anvil_bin"

#!/usr/bin/env bash
# app-template as a new user meets it: the real `cargo generate --path app-template` into a
# temp dir outside this workspace, a standalone `cargo build --release` of the generated
# project, `angel-host --lib` serving it, then an edit, a rebuild and a HUP that rolls onto it.
#
#   bench/scripts/template-roundtrip.sh            # needs cargo-generate (see below)
#   KEEP=1 bench/scripts/template-roundtrip.sh     # leave the temp dir for a look
#
# cargo-generate: `cargo install --locked cargo-generate` (0.26 needs rustc 1.97; on rustc
# 1.95 `cargo install --locked cargo-generate@0.23.7` builds). The generated project gets its
# own target dir and lock file, as a user's would: the first build compiles every dependency
# (several minutes on 2 cores); set CARGO_TARGET_DIR to reuse one between runs.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
host_bin="$root/target/release/angel-host"

if ! command -v cargo-generate >/dev/null 2>&1; then
  echo "skipped: cargo-generate is not installed (cargo install --locked cargo-generate)" >&2
  exit 2
fi
[ -x "$host_bin" ] || cargo build --release -p angel-host --manifest-path "$root/Cargo.toml"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/angel-template-XXXXXX")"
host_pid=""
cleanup() {
  [ -n "$host_pid" ] && kill -INT "$host_pid" 2>/dev/null && wait "$host_pid" 2>/dev/null
  if [ -n "${KEEP:-}" ]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }
fail() { echo "FAILED: $*" >&2; [ -f "$tmp/host.log" ] && tail -n 30 "$tmp/host.log" >&2; exit 1; }

step "cargo generate (sdk at $root/sdk)"
cd "$tmp"
cargo generate --path "$root/app-template" --name my-app --define angel_sdk="$root/sdk" --silent
cd my-app
find . -path ./.git -prune -o -type f -print | sort
grep -q '^name = "my-app"' Cargo.toml || fail "Cargo.toml is not the rendered Cargo.toml.liquid"
! grep -q 'workspace' Cargo.toml || fail "the generated Cargo.toml still refers to a workspace"
[ ! -e plain ] && [ ! -e Cargo.toml.liquid ] && [ ! -e cargo-generate.toml ] \
  || fail "workspace-only files were copied into the project"
! grep -rq '{{' src Cargo.toml || fail "unrendered placeholders left"
[ -f .gitignore ] || fail "no .gitignore (target/ would be committed)"

step "cargo build --release (standalone)"
start=$(date +%s)
cargo build --release
echo "built in $(( $(date +%s) - start )) s"
lib="$PWD/target/release/libmy_app.so"
[ -f "$lib" ] || fail "no $lib"
[ -z "${CARGO_TARGET_DIR:-}" ] || lib="$CARGO_TARGET_DIR/release/libmy_app.so"

step "angel-host --lib $lib"
"$host_bin" --lib "$lib" --host 127.0.0.1 --port 0 --workers 2 --pidfile "$tmp/angel.pid" \
  >"$tmp/host.log" 2>&1 &
host_pid=$!
port=""
for _ in $(seq 1 300); do
  port=$(sed -n 's/.*master\[[0-9]*\] listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$tmp/host.log" | head -n1)
  grep -q "serving " "$tmp/host.log" && [ -n "$port" ] && break
  kill -0 "$host_pid" 2>/dev/null || fail "angel-host exited"
  sleep 0.1
done
grep -q "serving " "$tmp/host.log" || fail "not serving after 30 s"
body=$(curl -fsS "http://127.0.0.1:$port/")
echo "GET / -> $body"
[ "$body" = "Hello from angel-host" ] || fail "unexpected body $body"
[ "$(curl -fsS "http://127.0.0.1:$port/healthz")" = ok ] || fail "/healthz"

step "edit, rebuild, HUP"
sed -i 's/Hello from angel-host\\n/Hello from my-app\\n/' src/lib.rs
cargo build --release
kill -HUP "$host_pid"
for _ in $(seq 1 300); do
  grep -q "reloaded " "$tmp/host.log" && break
  grep -q "reload failed\|reload skipped" "$tmp/host.log" && fail "roll refused"
  sleep 0.1
done
grep -q "reloaded " "$tmp/host.log" || fail "no roll after 30 s"
body=$(curl -fsS "http://127.0.0.1:$port/")
echo "GET / -> $body"
[ "$body" = "Hello from my-app" ] || fail "the new build does not serve: $body"
grep -E "serving|reloaded" "$tmp/host.log"
echo
echo "template round trip: ok"

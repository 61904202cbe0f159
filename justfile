# The usual recipes; each one goes through ./dev, which installs what it needs into .venv.
# (README's two commands are ./dev run and ./dev test, so just is never required.)

# run the supervisor (embedded Postgres unless DATABASE_URL is set)
run *ARGS:
    ./dev run {{ARGS}}

# the whole test suite (CI runs exactly this)
test *ARGS:
    ./dev test {{ARGS}}

# ruff and mypy --strict
lint:
    ./dev lint

# qdworker's own benchmark (add --json for JSON lines)
bench *ARGS:
    ./dev bench {{ARGS}}

# the side-by-side benchmark of the peers, qdworker included (about 18 minutes)
peers OUT="/tmp/qdworker-peers.jsonl":
    ./dev sh bash ../shared/peers-bench/run_all.sh {{OUT}}

# Recipes for working on the demo. `just` alone lists them.

python := "python3"
venv := ".venv"

# List the recipes
default:
    @just --list

# Create the virtualenv and install requirements.txt into it
install:
    {{ python }} -m venv {{ venv }}
    {{ venv }}/bin/pip install -q -r requirements.txt

# Run the app on http://127.0.0.1:8000 with the embedded in-process store
run: install
    {{ venv }}/bin/uvicorn main:app --reload --http h11 --limit-concurrency 1000

# Run the tests on the embedded fake Redis
test: install
    {{ venv }}/bin/python -m pytest

# Run the tests with a coverage report
cov: install
    {{ venv }}/bin/python -m pytest --cov=main --cov-report=term-missing

# Mutation testing of main.py with mutmut: the score and each survivor's diff (args: mutant name globs)
mutants *names:
    .ci/mutants {{ names }}

# Many keep-alive clients at once against a running app; fails on any answer but 200 or 429 (args: --clients N --seconds S)
load *args: install
    {{ venv }}/bin/python .ci/load {{ args }}

# Run the tests against a throwaway local redis-server (needs the redis-server binary)
test-redis: install
    .ci/with-redis {{ venv }}/bin/python -m pytest

# Run the tests against a throwaway local 3-master Redis Cluster (needs redis-server and redis-cli)
test-cluster: install
    .ci/with-cluster {{ venv }}/bin/python -m pytest

# Run the tests against a throwaway primary, replica and three Sentinels (needs redis-server and redis-cli)
test-sentinel: install
    .ci/with-sentinel {{ venv }}/bin/python -m pytest

# Lint: ruff, mypy, hadolint on the Dockerfile, and the compose file against its schema
lint: install
    {{ venv }}/bin/pip install -q -r .ci/tools.txt
    {{ venv }}/bin/ruff check .
    {{ venv }}/bin/ruff format --check .
    {{ venv }}/bin/mypy --check-untyped-defs --ignore-missing-imports main.py
    {{ venv }}/bin/hadolint Dockerfile
    {{ venv }}/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.yaml

# Build the Docker image
build:
    docker compose build

# Start the API and Redis in the background (needs SECRET_KEY and REDIS_PASSWORD in .env)
up:
    docker compose up --build --detach

# Stop the services
down:
    docker compose down

# Rebuild and restart the services
restart: down up

# Stop the services and remove their containers, volumes and the built image
clean:
    docker compose down --volumes --rmi local --remove-orphans

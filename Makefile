# Tabby on Modal: every target is a thin call of `tabby-modal` or `modal ... -m apps.X`.
# Targets that talk to Modal check credentials offline first and stop at once (exit 2) without them.

SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
TM    := $(VENV)/bin/tabby-modal
MODAL := $(VENV)/bin/modal
# uv must use this machine's Python and never download one.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON_PREFERENCE := only-system

LOCAL ?= .local
# Modal environment from settings (TABBY_MODAL_MODAL_ENVIRONMENT, env or .env); empty = your default.
MODAL_ENV = $(shell $(TM) config --get modal_environment 2>/dev/null)
ENVF = $(if $(MODAL_ENV),-e $(MODAL_ENV))
YESF = $(if $(YES),--yes)

.PHONY: help install test stress lint format config doctor need-modal secrets warm-cache deploy deploy-warmer \
	deploy-server deploy-maintenance stop-server rotate-jwt-secret serve-local smoke bench bench-scale backup-volume snapshots inspect-volume \
	verify-backups restore-volume reset-volume prune-backups warm cold status upgrade

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

install: ## Create .venv from uv.lock with python3 (no uv on PATH: bootstraps it in .uv-bootstrap/)
	@bash scripts/install.sh

test: ## Run the test suite (stress runs excluded), two workers
	$(VENV)/bin/pytest -q -m "not stress" -n 2 --dist loadfile

stress: ## Longer stress runs
	$(VENV)/bin/pytest -q -m stress

lint: ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

config: ## Print resolved settings with their source
	@$(TM) config

doctor: ## Offline checks, plus online ones with credentials
	@$(TM) doctor

need-modal:
	@$(TM) check-credentials

secrets: need-modal ## Create the Modal secret (JWT secret + setup token) if missing
	@$(TM) secrets

warm-cache: need-modal ## Build the image with the models baked in and check them
	$(MODAL) run $(ENVF) -m apps.warmer

deploy-warmer: need-modal
	$(MODAL) deploy $(ENVF) -m apps.warmer

deploy-server: need-modal ## Deploy the GPU server (recreate: never two writers on /data)
	$(MODAL) deploy $(ENVF) -m apps.server --strategy recreate
	@$(TM) apply-warm-hours  # a deploy resets min_containers: put the warm hours back now, not in 5 minutes

deploy-maintenance: need-modal ## Deploy the maintenance app (backups, restore, scheduled snapshots)
	$(MODAL) deploy $(ENVF) -m apps.maintenance

deploy: deploy-warmer deploy-maintenance deploy-server ## Deploy all three apps

stop-server: need-modal ## Stop the server app's containers (before restore/reset)
	$(MODAL) app stop $(ENVF) $(shell $(TM) config --get server_app)

rotate-jwt-secret: need-modal ## New JWT secret, setup token and inference key in tabby-secrets, then stop and redeploy the server
	@uuid() { $(PY) -c 'import uuid; print(uuid.uuid4())'; }; \
	$(MODAL) secret create $(ENVF) --force "$$($(TM) config --get secret_name)" \
		TABBY_WEBSERVER_JWT_TOKEN_SECRET="$$(uuid)" TABBY_MODAL_SETUP_TOKEN="$$(uuid)" \
		TABBY_MODAL_INFERENCE_KEY="$$(uuid)" >/dev/null
	@echo "rotated: browser sessions end now; IDE auth tokens keep working"
	@$(MAKE) --no-print-directory stop-server
	@$(MAKE) --no-print-directory deploy-server

upgrade: need-modal ## make upgrade TABBY_IMAGE=tabbyml/tabby:X.Y.Z [TOKEN=auth_...] [YES=1]; ROLLBACK=1 undoes the last one
	@test -n "$(TABBY_IMAGE)$(ROLLBACK)" || { echo "usage: make upgrade TABBY_IMAGE=tabbyml/tabby:X.Y.Z [TOKEN=...]" >&2; exit 2; }
	$(TM) upgrade $(if $(ROLLBACK),--rollback,--image "$(TABBY_IMAGE)") $(if $(TOKEN),--token "$(TOKEN)") $(YESF)

status: ## One screen: is it up, is it safe (exit 1 when something needs a person; works offline)
	@$(TM) status

warm: need-modal ## Keep one server container up (min_containers=1) until `make cold` or a server deploy
	$(TM) warm

cold: need-modal ## Let the server scale to zero when idle (min_containers=0)
	$(TM) cold

serve-local: ## Run Tabby + the proxy locally (needs TABBY_BIN or tabby on PATH)
	$(TM) serve --local $(LOCAL)

smoke: ## Smoke-test a deployment: make smoke URL=https://... TOKEN=auth_...
	@test -n "$(URL)" || { echo "usage: make smoke URL=https://... TOKEN=..." >&2; exit 2; }
	$(PY) scripts/smoke.py --url "$(URL)" --token "$(TOKEN)"

bench: ## Benchmarks: tables of side-by-side figures (about 20 min; the team-size run alone: `make bench-scale`)
	@for s in scripts/bench_*.py; do echo "== $$s"; $(PY) $$s || exit $$?; done

bench-scale: ## The state engine at a team's size: 20k, 1 GiB and 200k-file roots (about 8 min; QUICK=1: 1 min)
	$(PY) scripts/bench_scale.py $(if $(QUICK),--quick)

backup-volume: need-modal ## Snapshot the data Volume now
	$(TM) snapshot --label manual

snapshots: need-modal ## List snapshots
	$(TM) snapshots

inspect-volume: need-modal ## What is in the data Volume and the DB
	$(TM) inspect

verify-backups: need-modal ## Rehash blobs and restore-drill the DB of every snapshot
	$(TM) verify

restore-volume: need-modal ## make restore-volume SNAPSHOT=<id> [YES=1]
	@test -n "$(SNAPSHOT)" || { echo "usage: make restore-volume SNAPSHOT=<id>" >&2; exit 2; }
	$(TM) restore "$(SNAPSHOT)" $(YESF)

reset-volume: need-modal ## make reset-volume SCOPE=all|auth|index [YES=1]
	@test -n "$(SCOPE)" || { echo "usage: make reset-volume SCOPE=all|auth|index" >&2; exit 2; }
	$(TM) reset --scope "$(SCOPE)" $(YESF)

prune-backups: need-modal ## Apply the retention settings to snapshots [YES=1]
	$(TM) prune $(YESF)

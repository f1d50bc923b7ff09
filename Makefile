# xnbdd — the two commands of the README are `make run` and `make test`; the rest are helpers.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    := .venv
PY      := $(VENV)/bin/python
STATE   := .state
IMAGE   ?= $(STATE)/disk.img
PORT    ?= 8520
PREFIX  ?= /usr/local
DESTDIR ?=
PYTHON  ?= python3

# Units go where systemd looks for them: for the distribution prefix, where this system's systemd
# says (/usr/lib/systemd/system on Debian 13, /lib/systemd/system on Debian 12);
# $(PREFIX)/lib/systemd/system otherwise.
ifeq ($(PREFIX),/usr)
UNITDIR ?= $(or $(shell pkg-config --variable=systemdsystemunitdir systemd 2>/dev/null),/usr/lib/systemd/system)
else
UNITDIR ?= $(PREFIX)/lib/systemd/system
endif

.PHONY: help run test lint check bench bench-pin install deb man clean

help:
	@echo "make run    serve IMAGE (default $(STATE)/disk.img, 1 GiB sparse) on PORT (default 8520)"
	@echo "make test   install what the tests need, then ruff, mypy and the whole pytest suite"
	@echo "make lint   ruff + mypy          make bench    benchmark against peer NBD servers"
	@echo "make bench-pin   the same with the server and fio pinned to one core each"
	@echo "make deb    build the Debian package into build/deb/"
	@echo "make install [PREFIX=/usr/local] [DESTDIR=]"

run:
	@scripts/bootstrap.sh run
	@if [ "$(IMAGE)" = "$(STATE)/disk.img" ] && [ ! -e "$(IMAGE)" ]; then \
		mkdir -p $(STATE) && truncate -s 1G "$(IMAGE)" && echo "created sparse 1 GiB $(IMAGE)"; fi
	exec $(VENV)/bin/xnbd-server --target "$(IMAGE)" --lport $(PORT)

test:
	@scripts/bootstrap.sh test
	scripts/check.sh

lint:
	@scripts/bootstrap.sh test
	scripts/check.sh lint

bench:
	@scripts/bootstrap.sh test
	$(PY) bench/run.py

# One core each for the server and fio: what a core buys from each server (bench/README.md).
bench-pin:
	@scripts/bootstrap.sh test
	$(PY) bench/run.py --pin

# pip writes the programs and the package under $(DESTDIR)$(PREFIX) for $(PYTHON) (on Debian,
# prefer the package: make deb); systemd files and the example configuration are plain copies.
install:
	$(PYTHON) -m pip install --no-deps --root="$(or $(DESTDIR),/)" --prefix="$(PREFIX)" .
	install -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)/etc/xnbd"
	@set -e; for f in units/*; do [ -f "$$f" ] || continue; \
		install -m 0644 "$$f" "$(DESTDIR)$(UNITDIR)/"; done
	@set -e; cd etc && find . -type f | while read -r f; do \
		install -D -m 0644 "$$f" "$(DESTDIR)/etc/$${f#./}"; done

deb:
	@scripts/bootstrap.sh deb
	scripts/build-deb.sh build/deb

man:
	@scripts/bootstrap.sh run
	$(PY) packaging/gen_man.py build/man

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache

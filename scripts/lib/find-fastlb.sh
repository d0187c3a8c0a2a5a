# scripts/lib/find-fastlb.sh - which fastlb a script runs: the one place that decides it.
# Sourced (POSIX sh) by scripts/* and the Makefile, from the checkout's root or with fastlb_root set
# to it:
#
#   . scripts/lib/find-fastlb.sh
#   fastlb_find scripts/NAME || exit 1
#   exec "$FASTLB_PYTHON" -m fastlb.something "$@"
#
# fastlb_find WHO sets FASTLB_PYTHON (an interpreter that imports fastlb) and FASTLB_BIN (the
# `fastlb` command that goes with it) and says in one line on stderr which one WHO uses and why.
# It takes the first of:
#   1. $FASTLB_VENV               a venv directory; an error if it does not hold fastlb
#   2. $PYTHON                    only if that interpreter imports fastlb (other scripts use PYTHON
#                                 as the interpreter that creates a venv)
#   3. .venv in the checkout      what README command 1 makes (`scripts/venv .venv`)
#   4. /usr/local/bin/fastlb      what scripts/install makes (its venv is /opt/fastlb)
#   5. `fastlb` on PATH           e.g. an activated venv
# and returns 1, after one line saying what was looked at and how to get fastlb, when none has it.
# FASTLB_INSTALLED overrides the path of 4 (the tests use it).

fastlb_root=${fastlb_root:-$(pwd -P)}

# fastlb_venv_dir: the venv the scripts use and `make build` / scripts/test / scripts/bench create
fastlb_venv_dir() {
    printf '%s\n' "${FASTLB_VENV:-$fastlb_root/.venv}"
}

# fastlb_version PY: print fastlb's version if PY imports fastlb (its data plane built), else fail
fastlb_version() {
    [ -x "$1" ] || return 1
    "$1" -c 'import fastlb._core, fastlb; print(fastlb.__version__)' 2>/dev/null
}

# _fastlb_use WHO PY BIN WHY: export the choice and announce it
_fastlb_use() {
    FASTLB_PYTHON=$(_fastlb_abs "$2")
    FASTLB_BIN=$(_fastlb_abs "$3")
    export FASTLB_PYTHON FASTLB_BIN
    echo "$1: using fastlb $_fastlb_v from $FASTLB_PYTHON ($4)" >&2
}

# _fastlb_abs PATH: PATH made absolute against the current directory (symlinks kept: a venv's
# bin/python is one)
_fastlb_abs() {
    case $1 in
    /* | '') printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$(pwd)" "$1" ;;
    esac
}

# _fastlb_python_of BIN: the interpreter of a `fastlb` console script (the python beside it in its
# venv, else its #! line)
_fastlb_python_of() {
    _fastlb_real=$(readlink -f "$1") || return 1
    if [ -x "${_fastlb_real%/*}/python" ]; then
        printf '%s\n' "${_fastlb_real%/*}/python"
    else
        sed -n '1s/^#![[:space:]]*\([^[:space:]]*\).*/\1/p' "$_fastlb_real"
    fi
}

fastlb_find() {
    _fastlb_who=${1:-fastlb}
    if [ -n "${FASTLB_VENV:-}" ]; then
        if _fastlb_v=$(fastlb_version "$FASTLB_VENV/bin/python"); then
            _fastlb_use "$_fastlb_who" "$FASTLB_VENV/bin/python" "$FASTLB_VENV/bin/fastlb" "FASTLB_VENV"
            return 0
        fi
        echo "$_fastlb_who: FASTLB_VENV=$FASTLB_VENV holds no fastlb (make one: scripts/venv $FASTLB_VENV)" >&2
        return 1
    fi
    if [ -n "${PYTHON:-}" ]; then
        _fastlb_py=$(command -v "$PYTHON" 2>/dev/null || true)
        if [ -n "$_fastlb_py" ] && _fastlb_v=$(fastlb_version "$_fastlb_py"); then
            _fastlb_bin=${_fastlb_py%/*}/fastlb
            [ -x "$_fastlb_bin" ] || _fastlb_bin=
            _fastlb_use "$_fastlb_who" "$_fastlb_py" "$_fastlb_bin" "PYTHON"
            return 0
        fi
    fi
    if _fastlb_v=$(fastlb_version "$fastlb_root/.venv/bin/python"); then
        _fastlb_use "$_fastlb_who" "$fastlb_root/.venv/bin/python" "$fastlb_root/.venv/bin/fastlb" "the checkout's .venv"
        return 0
    fi
    for _fastlb_bin in "${FASTLB_INSTALLED:-/usr/local/bin/fastlb}" "$(command -v fastlb 2>/dev/null || true)"; do
        [ -n "$_fastlb_bin" ] && [ -x "$_fastlb_bin" ] || continue
        _fastlb_py=$(_fastlb_python_of "$_fastlb_bin") || continue
        if _fastlb_v=$(fastlb_version "$_fastlb_py"); then
            _fastlb_use "$_fastlb_who" "$_fastlb_py" "$_fastlb_bin" "$_fastlb_bin"
            return 0
        fi
    done
    echo "$_fastlb_who: no fastlb found (FASTLB_VENV unset, no $fastlb_root/.venv," \
        "no ${FASTLB_INSTALLED:-/usr/local/bin/fastlb}, none on PATH): run scripts/venv .venv" \
        "(README command 1) or scripts/install, or set FASTLB_VENV=DIR" >&2
    return 1
}

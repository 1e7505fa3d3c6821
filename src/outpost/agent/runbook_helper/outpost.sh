# Outpost runbook helper for bash and sh. Source it at the top of a runbook:
#
#   set -e
#   . "$OUTPOST_HELPER_DIR/outpost.sh"
#
#   outpost_warning TEXT...                   a Warning record
#   outpost_verbose TEXT...                   a Verbose record (kept with --log-verbose)
#   outpost_debug TEXT...                     a Debug record
#   outpost_progress PERCENT TEXT...          a Progress record "PERCENT% TEXT" (--log-progress)
#   outpost_variable NAME                     prints the variable's value
#   outpost_credential_user NAME              prints the credential's user name
#   outpost_credential_secret NAME            prints the credential's secret
#   outpost_certificate NAME|THUMBPRINT       prints the certificate (PEM, leaf first)
#   outpost_certificate_key NAME|THUMBPRINT   prints its private key (PEM)
#   outpost_identity                          prints the job identity (JSON)
#
# A fetch that fails prints the hub's message on stderr (the job's Error stream) and returns
# 1, which ends a runbook that runs under 'set -e'. The fetches call the Python helper beside
# this file with the job's own token; the token is never in the environment.

_outpost_python=@OUTPOST_PYTHON@
_outpost_dir=${OUTPOST_HELPER_DIR:-$(dirname "$0")/.outpost}

_outpost_record() {
    _outpost_prefix=$1
    shift
    # Every line gets the prefix, or the lines after the first would land in Output.
    printf '%s\n' "$*" | while IFS= read -r _outpost_line || [ -n "$_outpost_line" ]; do
        printf '%s: %s\n' "$_outpost_prefix" "$_outpost_line"
    done
}

outpost_warning() { _outpost_record WARNING "$@"; }
outpost_verbose() { _outpost_record VERBOSE "$@"; }
outpost_debug() { _outpost_record DEBUG "$@"; }

outpost_progress() {
    case ${1:-} in
        '' | *[!0-9]*)
            echo "outpost_progress: the percentage must be a whole number from 0 to 100," \
                 "not '${1:-}'" >&2
            return 2 ;;
    esac
    if [ "$1" -gt 100 ]; then
        echo "outpost_progress: the percentage must be from 0 to 100, not '$1'" >&2
        return 2
    fi
    _outpost_percent=$1
    shift
    if [ $# -gt 0 ]; then
        printf 'PROGRESS: %s%% %s\n' "$_outpost_percent" "$*"
    else
        printf 'PROGRESS: %s%%\n' "$_outpost_percent"
    fi
}

_outpost_helper() { "$_outpost_python" "$_outpost_dir/outpost_runbook.py" "$@"; }

outpost_variable() { _outpost_helper variable "$1"; }
outpost_credential_user() { _outpost_helper credential "$1" user; }
outpost_credential_secret() { _outpost_helper credential "$1" secret; }
outpost_certificate() { _outpost_helper certificate "$1"; }
outpost_certificate_key() { _outpost_helper certificate "$1" --key; }
outpost_identity() { _outpost_helper identity; }

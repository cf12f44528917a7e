# shellcheck shell=bash
# Helpers shared by the launch/ scripts; source it, do not run it:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Gives: die, warn, shell_quote, quote_cmd, run_cmd (honours DRY_RUN=1), take_value,
# flag_key, require, is_uint. Written for bash >= 3.2 (no associative arrays, no mapfile).

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'
  case "${1-}" in -h|--help) exit 0 ;; *) exit 2 ;; esac
fi

# The script's name in messages, e.g. "tpu.sh".
PROG=$(basename "$0")
# 1: print commands instead of running them.
DRY_RUN=${DRY_RUN:-0}

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
warn() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# shell_quote WORD: WORD as one POSIX shell word: as it is when that is safe, else in double
# quotes when it has a ' but nothing that double quotes would expand, else in single quotes.
# Works in sh, bash, zsh alike, so it serves both for display and for the command strings
# sent to remote shells.
shell_quote() {
  if [[ -n "$1" && "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  elif [[ "$1" == *\'* && "$1" != *[\"\$\`\\!]* ]]; then
    printf '"%s"' "$1"
  else
    local q="'\\''"
    printf "'%s'" "${1//\'/$q}"
  fi
}

# quote_cmd ARG...: the arguments as one command line that re-parses to the same words.
quote_cmd() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shell_quote "$a")"
  done
  printf '%s' "$out"
}

# run_cmd CMD ARG...: run a command; with DRY_RUN=1 only print it (copy-pasteable).
# In real mode the command is echoed to stderr with a "+ " prefix first.
run_cmd() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

# flag_key ARG: the option name of "--some_flag=value" / "--some-flag", with "_" as "-".
flag_key() {
  local k=${1%%=*}
  printf '%s' "${k//_/-}"
}

# take_value ARG NEXT...: the value of an option given as "--opt=value" or "--opt value".
# Sets OPT_VALUE, and OPT_SHIFT (how many more arguments the caller must shift: 0 or 1).
#   --zone|--zone=*) take_value "$arg" "$@"; zone=$OPT_VALUE; shift "$OPT_SHIFT" ;;
# shellcheck disable=SC2034  # OPT_VALUE and OPT_SHIFT are for the caller
take_value() {
  local arg=$1
  shift
  if [[ "$arg" == *=* ]]; then
    OPT_VALUE=${arg#*=}
    OPT_SHIFT=0
  elif [[ $# -ge 1 ]]; then
    OPT_VALUE=$1
    OPT_SHIFT=1
  else
    die "option ${arg} needs a value"
  fi
}

# require VALUE FLAG ENVVAR [WHAT]: fail with a message naming both ways to give a setting.
require() {
  if [[ -z "$1" ]]; then
    die "missing ${4:-setting}: pass ${2}=... or set ${3}"
  fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

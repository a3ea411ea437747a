# What the launchers share, sourced (not run) by tpu_vm.sh, gpu.sh and slurm.sbatch after their
# `set -euo pipefail`: the flags every launcher takes, the parsing loop, and the helpers that
# print or run a command. Before sourcing, a launcher sets LAUNCHER (its name, for messages);
# after it, it defines parse_flag (its own flags) and calls parse_args "$@".
#
# Flags every launcher takes (the environment variable in brackets is the default):
#   --config=CONFIG   [G2E_CONFIG, default configs/mmeb.py]
#   --workdir=DIR     [G2E_WORKDIR]
#   --dry-run         print the commands instead of running them [DRY_RUN=1]
#   -h, --help        print the launcher's header comment
#   -- G2E_FLAGS...   everything after `--` goes to g2e.main (G2E_ARGS)
# shellcheck shell=bash
# shellcheck disable=SC2034   # the variables set here are read by the launcher that sources it

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"   # the checkout this file is in
CONFIG="${G2E_CONFIG:-configs/mmeb.py}"
WORKDIR="${G2E_WORKDIR:-}"
DRY_RUN="${DRY_RUN:-0}"
G2E_ARGS=()   # what follows `--`, for g2e.main
FORWARD=()    # the launcher's own arguments minus --dry-run (slurm.sbatch resubmits with them)

die() {
  echo "$LAUNCHER: $*" >&2
  exit 2
}

# Prints a command so that it can be pasted into a shell.
print_command() {
  local words=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      words+=("$arg")
    elif [[ "$arg" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
      words+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${words[*]}"
}

# Runs a command, or only prints it with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_command "$@"
  else
    echo "+ $(print_command "$@")" >&2
    "$@"
  fi
}

# Prints the launcher's header comment: from line 2 to `set -euo pipefail`, without the
# #SBATCH directives. $0 is the launcher (under sbatch, its spooled copy).
print_help() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; /^#SBATCH/d; s/^# \{0,1\}//'
}

# Parses the command line: the shared flags here, the launcher's own with parse_flag ARG,
# which returns non-zero for an argument it does not know.
parse_args() {
  while (($#)); do
    [[ "$1" == --dry-run ]] || FORWARD+=("$1")
    case "$1" in
      --config=*) CONFIG="${1#*=}" ;;
      --workdir=*) WORKDIR="${1#*=}" ;;
      --dry-run) DRY_RUN=1 ;;
      --) shift; G2E_ARGS=("$@"); FORWARD+=("$@"); break ;;
      -h | --help) print_help; exit 0 ;;
      *) parse_flag "$1" || die "unknown argument '$1' (see --help)" ;;
    esac
    shift
  done
}

# Dies when --workdir is a URL: g2e writes with local file I/O, so a bucket must be mounted.
# $1 is what the workdir must be, $2 how to mount the bucket (both for the message).
refuse_url_workdir() {
  [[ ! "$WORKDIR" =~ ^[A-Za-z][A-Za-z0-9+.-]*:// ]] ||
    die "--workdir must be $1, got the URL '$WORKDIR': g2e writes with local file I/O;" \
      "mount the bucket $2 and give the mounted path"
}

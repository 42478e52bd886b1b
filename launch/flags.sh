# Sourced by the launch scripts: their usage text and the check of required flags.

# Prints the calling script's header comment (from its second line to the first non-comment).
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

# require_flags WHAT --flag "$VALUE" [--flag "$VALUE" ...]: names every empty flag, then
# prints the usage and exits 2.
require_flags() {
  local what="$1" missing=()
  shift
  while [ $# -gt 0 ]; do
    [ -n "$2" ] || missing+=("$1")
    shift 2
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "$what needs: ${missing[*]}" >&2
    usage >&2
    exit 2
  fi
}

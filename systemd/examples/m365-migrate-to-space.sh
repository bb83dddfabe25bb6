#!/bin/bash
# m365-migrate-to-space.sh --account ACCOUNT [--resume]
#
# The runbook's migration of one OneDrive account into /space (rollback procedures,
# scenarios 1 and 3), in the shape spaceguard works with. Installed as
# /usr/local/bin/m365-migrate-to-space.sh and run by m365-migrate-wrapper@.service (or
# m365-migrate@.service) and, with --resume, by m365-migrate-resume@.service.
#
# - rclone runs as a child of this script, which waits for it and exits with rclone's
#   exit status (0 and 9 are success; spaceguard classifies the others). A SIGTERM (from
#   `systemctl stop`, spaceguard's stop mode, or the runbook's pkill) is passed on to
#   rclone, so it never outlives the script.
# - rclone appends to the account's log (--log-file); spaceguard follows it. The script's
#   own lines go there too, dated like rclone's: spaceguard acts only on lines of the
#   current run, and judges a dated line by its date.
# - --resume copies only what is missing or changed (rclone copy skips what is already
#   there and identical): it is what spaceguard starts after a pause by stopping, and for
#   a retry.
#
# Settings (the environment; the units set them):
#   RCLONE_LOG_FILE     the log (default /var/log/m365-migrate-ACCOUNT.log)
#   M365_SOURCE         the rclone source (default m365-ACCOUNT:)
#   M365_DESTINATION    where it goes (default /space/ACCOUNT)
#   M365_RCLONE_FLAGS   more rclone flags, split on blanks (e.g. "--transfers 8 --bwlimit 50M")
#   RCLONE              the rclone program (default rclone)
#   RCLONE_CONFIG       rclone's own: its config file
set -u

usage() {
    echo "usage: $0 --account ACCOUNT [--resume]" >&2
    exit 2
}

account=""
resume=0
while [ $# -gt 0 ]; do
    case "$1" in
        --account)
            [ $# -ge 2 ] || usage
            account=$2
            shift 2
            ;;
        --account=*)
            account=${1#--account=}
            shift
            ;;
        --resume)
            resume=1
            shift
            ;;
        *) usage ;;
    esac
done
# the names spaceguard accepts for an account: no path, no option, no blank
if ! [[ $account =~ ^[A-Za-z0-9][A-Za-z0-9_.@-]{0,127}$ ]]; then
    echo "$0: --account: not an account name: '$account'" >&2
    usage
fi

log=${RCLONE_LOG_FILE:-/var/log/m365-migrate-$account.log}
source=${M365_SOURCE:-m365-$account:}
destination=${M365_DESTINATION:-/space/$account}
rclone=${RCLONE:-rclone}
read -r -a flags <<<"${M365_RCLONE_FLAGS:-}"

note() {
    # rclone's own line format (local time, to the second), so that the log reads as one
    printf '%s NOTICE: m365-migrate-to-space.sh: %s\n' "$(date '+%Y/%m/%d %H:%M:%S')" "$*" \
        >>"$log"
}

if [ "$resume" = 1 ]; then
    note "resuming $source -> $destination (copies what is missing or changed)"
else
    note "starting $source -> $destination"
fi

"$rclone" copy "$source" "$destination" --log-file "$log" -v --stats 1m "${flags[@]}" &
child=$!
stopped=""
trap 'stopped=TERM; kill -TERM "$child" 2>/dev/null' TERM
trap 'stopped=INT; kill -INT "$child" 2>/dev/null' INT
status=0
wait "$child" || status=$?
while kill -0 "$child" 2>/dev/null; do # a trapped signal ended the wait, not rclone
    status=0
    wait "$child" || status=$?
done
if [ -n "$stopped" ]; then
    note "stopped (SIG$stopped); rclone exited with status $status"
    trap - "$stopped"
    kill -s "$stopped" $$ # end as the signal did: a stop, not a failure
fi
note "rclone exited with status $status"
exit "$status"

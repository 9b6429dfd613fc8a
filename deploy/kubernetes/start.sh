#!/bin/sh
# The command of every Synod pod: the pod's ordinal picks its config
# (synod-0 runs node-1.toml, synod-1 node-2.toml, ...), and a pod whose
# volume holds no database yet starts as SYNOD_INITIAL_CLUSTER_STATE says:
# "new" founds the cluster (--bootstrap: only for the first deployment),
# "existing" rejoins it (--join: a member whose volume was lost). Set it to
# "existing" once the cluster has formed. With POD_IP set (the downward
# API), the replica binds its ports on that address.
set -eu
config_dir="${SYNOD_CONFIG_DIR:-/etc/synod/config}"
data_dir="${SYNOD_DATA_DIR:-/var/lib/synod}"
ordinal="${HOSTNAME##*-}"
case "$ordinal" in
    ''|*[!0-9]*)
        echo "start.sh: cannot take an ordinal from HOSTNAME=$HOSTNAME" >&2
        exit 2
        ;;
esac
set -- --config "$config_dir/node-$((ordinal + 1)).toml"
if [ -n "${POD_IP:-}" ]; then
    set -- "$@" --listen-ip "$POD_IP"
fi
if [ -f "$data_dir/synod.redb" ]; then
    exec synod-server "$@"
fi
case "${SYNOD_INITIAL_CLUSTER_STATE:-existing}" in
    new) exec synod-server "$@" --bootstrap ;;
    existing) exec synod-server "$@" --join ;;
    *)
        echo "start.sh: SYNOD_INITIAL_CLUSTER_STATE must be new or existing" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# A one-node Ceph RGW on 127.0.0.1 for trying cosedge's [storage] backend = "s3":
#   bash etc/rgw-tryout.sh [FOLDER] [S3_PORT]        (default: ./rgw and 7480)
# A monitor, one OSD that keeps its objects in memory (memstore: gone when it stops),
# pools of one copy, no authentication inside the cluster, radosgw's beast frontend on
# 127.0.0.1:S3_PORT, and an S3 user AKIDlocal / local-secret-0123. Needs Debian's
# radosgw, ceph-mon and ceph-osd (apt-get install --no-install-recommends radosgw ceph-mon
# ceph-osd). Stop it with: pkill -f "$FOLDER/ceph.conf" (the daemons run in the background).
# Not for production: no authentication, no durability.
set -euo pipefail
dir=$(realpath -m "${1:-rgw}")
port=${2:-7480}
mon_port=$((port + 3300))
for tool in ceph-mon ceph-osd radosgw radosgw-admin monmaptool ceph-authtool ceph; do
    command -v "$tool" >/dev/null || { echo "rgw-tryout: $tool is not installed (apt-get install radosgw ceph-mon ceph-osd)" >&2; exit 1; }
done
[ ! -e "$dir/ceph.conf" ] || { echo "rgw-tryout: $dir already holds a cluster; stop it and remove the folder first" >&2; exit 1; }
mkdir -p "$dir"/{mon,osd/osd.0,run,log}
fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
cat > "$dir/ceph.conf" <<EOF
[global]
fsid = $fsid
mon_host = v1:127.0.0.1:$mon_port
mon_initial_members = a
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr2 = false
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
osd_crush_update_on_start = false
osd_class_update_on_start = false
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_objectstore = memstore
memstore_device_bytes = 1073741824
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
log_file = $dir/log/\$name.log
mon_data = $dir/mon/\$name
osd_data = $dir/osd/\$name
keyring = $dir/keyring

[client.rgw]
rgw_frontends = beast endpoint=127.0.0.1:$port
EOF
conf=(-c "$dir/ceph.conf")
ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. >/dev/null
monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$mon_port]" "$dir/monmap" >/dev/null
ceph-mon "${conf[@]}" --mkfs -i a --monmap "$dir/monmap"
ceph-mon "${conf[@]}" -i a
osd=$(python3 -c 'import uuid; print(uuid.uuid4())')
ceph "${conf[@]}" --connect-timeout 20 osd new "$osd" >/dev/null
ceph-osd "${conf[@]}" -i 0 --mkfs --osd-uuid "$osd" 2>/dev/null
ceph "${conf[@]}" osd crush add osd.0 1.0 root=default host=localhost 2>/dev/null
ceph-osd "${conf[@]}" -i 0
radosgw "${conf[@]}" -n client.rgw
for _ in $(seq 120); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.5
done
radosgw-admin "${conf[@]}" user create --uid=cosedge --display-name=cosedge \
    --access-key=AKIDlocal --secret-key=local-secret-0123 >/dev/null
echo "Ceph RGW answers S3 on http://127.0.0.1:$port (access key AKIDlocal, secret local-secret-0123)"

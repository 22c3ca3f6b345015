#!/usr/bin/env bash
# SLURM integration test: the `smoke` preset submitted to a real one-node SLURM cluster on localhost.
#
#   sudo bash tests/slurm_integration.sh          (root is needed for apt-get and the daemons)
#
# 1. Installs Debian's slurmctld, slurmd, slurmdbd, slurm-client, munge and mariadb-server.
# 2. Starts, all under a private work directory and on loopback only: munged (own key and socket),
#    MariaDB + slurmdbd (so `sacct` lists jobs, as on a real cluster), slurmctld and slurmd
#    (cgroup-free: proctrack/linuxproc, task/none, select/cons_tres), and waits for the node.
# 3. Runs the smoke preset locally (or reuses ESPARSE_LOCAL_RESULTS) and through SLURM with
#    `--profile workflow/profiles/slurm`. The first SLURM run has one prune job killed with
#    `scancel` mid-run: that run must fail naming the job as CANCELLED; a rerun must complete it.
# 4. Checks every job of the DAG ran as a SLURM job (sacct, by the plugin's job comment) and that
#    perplexities and mask/permutation/weight checksums equal the local run's.
# 5. Stops every daemon it started and removes its work directory (trap, also on failure).
#
# Environment: ESPARSE_DATA_MIRROR (default ../shared/data), ESPARSE_LOCAL_RESULTS (a finished local
# smoke results dir of the same checkout to compare with, skips the local run; if it holds no
# finished run, the local run is made), ESPARSE_SLURM_KEEP=1 (keep the work dir),
# ESPARSE_SLURM_CANCEL_RULE (rule whose job is cancelled, default prune), ESPARSE_SLURM_TIMEOUT
# (seconds per snakemake invocation, default 1800), ESPARSE_SLURM_EXTRA_CONFIG (extra `--config`
# items for every run, separated by ';'), ESPARSE_SLURM_CONFIGFILE (a YAML file of config overrides
# for every run; e.g. `{methods: [dense], ablation: {enabled: false}}` for a quick check of the
# harness itself), ESPARSE_SLURM_ARGS (extra snakemake arguments for the SLURM runs).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        exec sudo --preserve-env env "PATH=$PATH" bash "$0" "$@"
    fi
    echo "slurm_integration: needs root (apt-get, munged, slurmctld, slurmd); run it with sudo" >&2
    exit 2
fi

t_start=$(date +%s)
phase_start=$t_start
timings=()
phase() {  # phase NAME: record how long the phase that just ended took
    local now
    now=$(date +%s)
    timings+=("$(printf '%-28s %5ds' "$1" $((now - phase_start)))")
    phase_start=$now
}
say() { echo "[slurm-it $(date +%H:%M:%S)] $*"; }
fail() { echo "[slurm-it] FAILED: $*" >&2; exit 1; }

mirror="${ESPARSE_DATA_MIRROR:-$repo/../shared/data}"
mirror="$(cd "$mirror" && pwd)"
cancel_rule="${ESPARSE_SLURM_CANCEL_RULE:-prune}"
run_timeout="${ESPARSE_SLURM_TIMEOUT:-1800}"
IFS=';' read -r -a extra_config <<< "${ESPARSE_SLURM_EXTRA_CONFIG:-}"

# --- 1. packages ------------------------------------------------------------------------------------
packages=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
binaries=(munged sbatch slurmctld slurmd slurmdbd mariadbd mariadb-install-db)
missing=0
for b in "${binaries[@]}"; do
    command -v "$b" >/dev/null || [ -x "/usr/sbin/$b" ] || missing=1
done
if [ "$missing" = 1 ]; then
    say "installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # Keep the distribution's own services (munge, mariadb, slurm*) from starting on install: this
    # script runs private instances. A temporary policy-rc.d does that where none exists.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
    fi
    apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null || { [ -z "$policy" ] || rm -f "$policy"; exit 1; }
    [ -z "$policy" ] || rm -f "$policy"
fi
export PATH="/usr/sbin:/sbin:$PATH"
phase "apt install"

# --- Python environment -------------------------------------------------------------------------------
if ! python -c "import snakemake, snakemake_executor_plugin_slurm, esparse" 2>/dev/null; then
    # shellcheck disable=SC1091
    source workflow/setup_env.sh
fi
python -c "import snakemake, snakemake_executor_plugin_slurm" \
    || fail "snakemake and snakemake-executor-plugin-slurm must be importable"
phase "python env"

# --- 2. a private cluster -------------------------------------------------------------------------------
work="$(mktemp -d /tmp/esparse-slurm.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work"/{etc,state,spool,log,munge,db}
pids=()          # daemons and background runs started here, stopped in this order reversed
snk_pid=""
cleanup() {
    local rc=$?
    set +e
    if [ -n "$snk_pid" ] && kill -0 "$snk_pid" 2>/dev/null; then
        # A background snakemake run: TERM (timeout passes it on), so that it scancels its jobs
        # while the cluster is still up; KILL it and its child if it does not stop within a minute.
        kill "$snk_pid"
        for _ in $(seq 60); do kill -0 "$snk_pid" 2>/dev/null || break; sleep 1; done
        if kill -0 "$snk_pid" 2>/dev/null; then
            pkill -KILL -P "$snk_pid"; kill -KILL "$snk_pid"
        fi
        wait "$snk_pid" 2>/dev/null
    fi
    if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ] && [ ${#pids[@]} -gt 0 ]; then
        scancel --user=root --quiet 2>/dev/null
    fi
    local i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[i]}" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    done
    if [ $rc -ne 0 ]; then
        echo "---- daemon logs (tails) ----" >&2
        for f in "$work"/log/*.log; do [ -f "$f" ] && { echo "== $f" >&2; tail -n 15 "$f" >&2; }; done
    fi
    if [ "${ESPARSE_SLURM_KEEP:-0}" = 1 ]; then
        echo "work directory kept: $work" >&2
    else
        rm -rf "$work"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll until COMMAND succeeds
    local limit=$1 what=$2; shift 2
    local until=$(( $(date +%s) + limit ))
    while [ "$(date +%s)" -lt "$until" ]; do
        if [ "$(type -t "$1")" = function ]; then
            "$@" >/dev/null 2>&1 && return 0
        else
            timeout 10 "$@" >/dev/null 2>&1 && return 0
        fi
        sleep 0.5
    done
    fail "timed out after ${limit}s waiting for $what"
}

host="$(hostname -s)"
ctld_port=$(free_port); slurmd_port=$(free_port); dbd_port=$(free_port); db_port=$(free_port)
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))

say "munged"
chown munge:munge "$work/munge"
dd if=/dev/urandom of="$work/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$work/munge/munge.key"
chmod 400 "$work/munge/munge.key"
munge_socket="$work/munge/munge.socket"
runuser -u munge -- munged --foreground --socket="$munge_socket" --key-file="$work/munge/munge.key" \
    --pid-file="$work/munge/munged.pid" --log-file="$work/log/munged.log" \
    --seed-file="$work/munge/munged.seed" >"$work/log/munged.out" 2>&1 &
pids+=($!)
wait_for 20 munged test -S "$munge_socket"

say "MariaDB (accounting database for slurmdbd, loopback port $db_port)"
mariadb-install-db --no-defaults --user=root --datadir="$work/db" --auth-root-authentication-method=socket \
    --skip-test-db >"$work/log/mariadb-install.log" 2>&1
db_socket="$work/db/mysqld.sock"
mariadbd --no-defaults --user=root --datadir="$work/db" --socket="$db_socket" --port="$db_port" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$work/db/mariadb.pid" \
    --log-error="$work/log/mariadb.log" --innodb-buffer-pool-size=64M &
pids+=($!)
wait_for 60 MariaDB mariadb-admin --no-defaults --socket="$db_socket" ping
db_pass="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mariadb --no-defaults --socket="$db_socket" -u root <<SQL
CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$db_pass';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

export SLURM_CONF="$work/etc/slurm.conf"
cat >"$work/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$munge_socket
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$dbd_port
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=$db_pass
StorageLoc=slurm_acct_db
PidFile=$work/slurmdbd.pid
LogFile=$work/log/slurmdbd.log
CONF
chmod 600 "$work/etc/slurmdbd.conf"
cat >"$SLURM_CONF" <<CONF
# One-node test cluster on loopback, written by tests/slurm_integration.sh.
ClusterName=esparseci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$munge_socket
CredType=cred/munge
StateSaveLocation=$work/state
SlurmdSpoolDir=$work/spool
SlurmctldPidFile=$work/slurmctld.pid
SlurmdPidFile=$work/slurmd.pid
SlurmctldLogFile=$work/log/slurmctld.log
SlurmdLogFile=$work/log/slurmd.log
# No cgroups: containers and CI runners rarely delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
# Accounting through slurmdbd so that sacct works (the plugin's default status query); the plugin's
# --comment (rule and wildcards) is stored so that jobs can be matched to the DAG.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
# (for slurmdbd connections this names the munge socket)
AccountingStoragePass=$munge_socket
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
JobCompType=jobcomp/filetxt
JobCompLoc=$work/log/jobcomp.txt
MinJobAge=600
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF

say "slurmdbd (port $dbd_port)"
slurmdbd -D >"$work/log/slurmdbd.out" 2>&1 &
pids+=($!)
wait_for 60 slurmdbd sacctmgr --immediate list cluster
sacctmgr --immediate add cluster esparseci >/dev/null
# An account for the site overlay below (slurm_account), with root as its user.
sacctmgr --immediate add account esparse-ci Cluster=esparseci Description=ci Organization=ci >/dev/null
sacctmgr --immediate add user root Account=esparse-ci DefaultAccount=esparse-ci >/dev/null

# Inside a job the plugin's jobstep drops SLURM_* variables (SLURM_CONF included) before calling
# srun; clusters keep slurm.conf at its default path, this private one does not, so srun gets a
# wrapper that points it at this cluster's file (PATH is exported to jobs).
mkdir -p "$work/bin"
printf '#!/bin/sh\nSLURM_CONF=%s exec %s "$@"\n' "$SLURM_CONF" "$(command -v srun)" >"$work/bin/srun"
chmod 755 "$work/bin/srun"
export PATH="$work/bin:$PATH"

say "slurmctld (port $ctld_port), slurmd (port $slurmd_port): node $host, $cpus CPUs, ${mem_mb} MB"
slurmctld -D -i >"$work/log/slurmctld.out" 2>&1 &
pids+=($!)
wait_for 60 slurmctld scontrol ping
slurmd -D >"$work/log/slurmd.out" 2>&1 &
pids+=($!)
node_idle() { [ "$(sinfo -h -N -n "$host" -o %T)" = idle ]; }
wait_for 90 "node $host to be idle" node_idle
sinfo
phase "start cluster"

# --- 3. runs ------------------------------------------------------------------------------------------------
smoke_config=(preset=smoke "data_mirror=$mirror" "${extra_config[@]}")
configfile=()
if [ -n "${ESPARSE_SLURM_CONFIGFILE:-}" ]; then
    configfile=(--configfile "$(cd "$(dirname "$ESPARSE_SLURM_CONFIGFILE")" && pwd)/$(basename "$ESPARSE_SLURM_CONFIGFILE")")
fi

if [ -n "${ESPARSE_LOCAL_RESULTS:-}" ] && [ -f "$ESPARSE_LOCAL_RESULTS/tables/wikitext_ppl.csv" ]; then
    local_results="$(cd "$ESPARSE_LOCAL_RESULTS" && pwd)"
    say "reusing the local smoke run in $local_results"
else
    [ -z "${ESPARSE_LOCAL_RESULTS:-}" ] || say "no finished smoke run in $ESPARSE_LOCAL_RESULTS: running one"
    local_results="$work/local/results"
    say "local smoke run -> $local_results"
    timeout "$run_timeout" python -m snakemake --cores 2 "${configfile[@]}" --config "${smoke_config[@]}" "results_dir=$local_results" \
        >"$work/log/local-run.log" 2>&1 || { tail -n 40 "$work/log/local-run.log"; fail "local smoke run"; }
fi
phase "local smoke run"

slurm_results="$work/slurm/results"
# A site's edits as a second profile: the shipped default-resources plus account and partition (the
# SITE keys), exactly as docs/SLURM.md suggests; every other key comes from the shipped profile.
mkdir -p "$work/site-profile"
python - "$work/site-profile/config.yaml" <<'PY'
import sys, yaml
shipped = yaml.safe_load(open("workflow/profiles/slurm/config.yaml"))
site = {"default-resources": {**shipped["default-resources"], "slurm_account": "esparse-ci", "slurm_partition": "debug"}}
yaml.safe_dump(site, open(sys.argv[1], "w"))
PY
read -r -a slurm_args <<< "${ESPARSE_SLURM_ARGS:-}"
# Only the first status poll comes sooner than the profile's default (which suits real queues): the
# test cluster's jobs take seconds to minutes. An array, not a function, so that `$!` of a
# background run is the `timeout` process itself (it passes SIGTERM on to snakemake).
slurm_cmd=(timeout "$run_timeout" python -m snakemake --profile workflow/profiles/slurm --profile "$work/site-profile"
    --slurm-init-seconds-before-status-checks 4 --slurm-keep-successful-logs "${configfile[@]}" "${slurm_args[@]}"
    --config "${smoke_config[@]}" "results_dir=$slurm_results")

# The plan, for the sacct check: every job a fresh run needs, as the plugin's comment
# "rule_<rule>[_wildcards_<values joined by _>]".
python -m snakemake --profile workflow/profiles/slurm --profile "$work/site-profile" --dry-run "${configfile[@]}" \
    --config "${smoke_config[@]}" "results_dir=$slurm_results" >"$work/log/plan.log" 2>&1 \
    || { tail -n 40 "$work/log/plan.log"; fail "dry run"; }
python - "$work/log/plan.log" >"$work/expected_jobs.txt" <<'PY'
import re, sys
# Dry-run job blocks: "rule NAME:" then indented "key: value" lines. Jobs without outputs (rule all)
# run nowhere; the others are submitted, with the comment the plugin gives them.
blocks, current = [], None
for line in open(sys.argv[1]):
    m = re.match(r"^(?:local)?rule (\w+):$", line.strip())
    if m:
        current = {"rule": m.group(1)}
        blocks.append(current)
    elif current is not None and line.startswith("    ") and ": " in line:
        key, value = line.strip().split(": ", 1)
        current[key] = value
    elif not line.startswith(" "):
        current = None
jobs = []
for block in blocks:
    if "output" not in block:
        continue
    comment = f"rule_{block['rule']}"
    if "wildcards" in block:
        values = [item.split("=", 1)[1] for item in block["wildcards"].split(", ")]
        comment += "_wildcards_" + "_".join(values).replace("/", "_")
    jobs.append(comment)
print("\n".join(sorted(jobs)))
PY
say "the DAG has $(wc -l <"$work/expected_jobs.txt") jobs"
[ -s "$work/expected_jobs.txt" ] || fail "no jobs found in the dry run"
grep -q "^rule_${cancel_rule}" "$work/expected_jobs.txt" || fail "no ${cancel_rule} job in the DAG to cancel"
phase "plan"

say "SLURM run 1 (one ${cancel_rule} job will be cancelled mid-run)"
run1_log="$work/log/slurm-run1.log"
"${slurm_cmd[@]}" >"$run1_log" 2>&1 &
snk_pid=$!
cancelled=""
deadline=$(( $(date +%s) + run_timeout ))
while [ -z "$cancelled" ]; do
    kill -0 "$snk_pid" 2>/dev/null || { tail -n 40 "$run1_log"; fail "run 1 ended before a ${cancel_rule} job could be cancelled"; }
    [ "$(date +%s)" -lt "$deadline" ] || fail "no running ${cancel_rule} job seen"
    line="$(squeue -h -t RUNNING -o '%i|%k' | grep "|rule_${cancel_rule}" | head -n 1 || true)"
    if [ -n "$line" ]; then
        jobid="${line%%|*}"
        comment="${line#*|}"
        # Mid-run: the step has started and written to its log, logs/<rule>/<wildcard values>.log.
        values="${comment#rule_${cancel_rule}}"
        values="${values#_wildcards_}"
        step_log="$slurm_results/logs/$cancel_rule/${values//_//}.log"
        if [ -s "$step_log" ]; then
            sleep 2
            if squeue -h -j "$jobid" -t RUNNING -o %i 2>/dev/null | grep -q .; then
                say "scancel $jobid ($comment; its log: $(tail -n 1 "$step_log" | cut -c1-120))"
                scancel "$jobid"
                cancelled="$jobid"
            fi
        fi
    fi
    sleep 1
done
# The plugin polls squeue (the profile's status command): it must report the cancellation within a
# few polls; snakemake then finishes the independent jobs (keep-going) and exits non-zero.
reported() { grep -q "SLURM-job '$cancelled' failed" "$run1_log"; }
wait_for 300 "the plugin to report job $cancelled as failed" reported
set +e
wait "$snk_pid"
run1_rc=$?
set -e
snk_pid=""
[ "$run1_rc" -ne 0 ] || fail "run 1 succeeded although job $cancelled was cancelled"
grep -q "SLURM-job '$cancelled' failed, SLURM status is: 'CANCELLED" "$run1_log" \
    || { tail -n 60 "$run1_log"; fail "run 1 did not report job $cancelled as CANCELLED"; }
grep -q "Error in rule ${cancel_rule}:" "$run1_log" || fail "run 1 did not name the failed rule"
say "run 1 failed as expected (rc $run1_rc): $(grep -m1 "SLURM-job '$cancelled'" "$run1_log" | sed 's/^ *//')"
phase "slurm run 1 (cancelled)"

say "SLURM run 2 (rerun)"
run2_log="$work/log/slurm-run2.log"
"${slurm_cmd[@]}" >"$run2_log" 2>&1 || { tail -n 60 "$run2_log"; fail "SLURM rerun"; }
phase "slurm run 2 (rerun)"

# --- 4. checks -------------------------------------------------------------------------------------------
say "checking sacct and the results"
sacct --allusers --allocations --parsable2 --noheader --starttime "$(date -d "@$t_start" +%Y-%m-%dT%H:%M:%S)" \
    --format=JobIDRaw,JobName%60,State,ExitCode,Comment%200,Account,Partition,Elapsed,ReqMem,Timelimit >"$work/sacct.txt"
sacct --allusers --parsable2 --starttime "$(date -d "@$t_start" +%Y-%m-%dT%H:%M:%S)" \
    --format=JobIDRaw,State,Comment%200,Elapsed,MaxRSS,ReqMem,AllocCPUS,Timelimit >"$work/sacct-steps.txt"
python - "$work/expected_jobs.txt" "$work/sacct.txt" "$cancelled" "$run1_log" "$run2_log" <<'PY'
import re, sys
expected = [line for line in open(sys.argv[1]).read().split() if line]
rows = [line.rstrip("\n").split("|") for line in open(sys.argv[2]) if line.strip()]
cancelled = sys.argv[3]
submitted = set()
for log in sys.argv[4:]:
    submitted |= set(re.findall(r"has been submitted with SLURM jobid (\d+)", open(log).read()))
jobs = {r[0]: {"state": r[2], "comment": r[4], "account": r[5], "partition": r[6]} for r in rows}
problems = []
wrong_place = {i: (j["account"], j["partition"]) for i, j in jobs.items()
               if (j["account"], j["partition"]) != ("esparse-ci", "debug")}
if wrong_place:
    problems.append(f"jobs not submitted with the site's account/partition: {wrong_place}")
if set(jobs) != submitted:
    problems.append(f"sacct jobs {sorted(jobs)} != jobs the runs submitted {sorted(submitted)}")
completed = sorted(j["comment"] for j in jobs.values() if j["state"] == "COMPLETED")
if completed != sorted(expected):
    problems.append(f"COMPLETED SLURM jobs do not match the DAG:\n  missing {sorted(set(expected) - set(completed))}"
                    f"\n  unexpected {sorted(set(completed) - set(expected))}\n  duplicated "
                    f"{sorted({c for c in completed if completed.count(c) > 1})}")
others = {i: j for i, j in jobs.items() if j["state"] != "COMPLETED"}
if set(others) != {cancelled} or not others[cancelled]["state"].startswith("CANCELLED"):
    problems.append(f"expected exactly job {cancelled} CANCELLED besides the completed ones, got {others}")
if problems:
    sys.exit("sacct check failed:\n" + "\n".join(problems))
print(f"sacct: {len(completed)} COMPLETED jobs = the {len(expected)} jobs of the DAG; job {cancelled} "
      f"{others[cancelled]['state']}")
PY
python - "$local_results" "$slurm_results" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
local, slurm = Path(sys.argv[1]), Path(sys.argv[2])
key = ["model", "method", "pattern"]
a = pd.read_csv(local / "tables" / "wikitext_ppl.csv").set_index(key).sort_index()
b = pd.read_csv(slurm / "tables" / "wikitext_ppl.csv").set_index(key).sort_index()
problems = []
if list(a.index) != list(b.index):
    problems.append(f"different rows: {list(a.index)} vs {list(b.index)}")
else:
    for column in ("seqlen", "windows", "ppl"):
        if not (a[column] == b[column]).all():
            problems.append(f"{column} differs:\n{a[column]}\n{b[column]}")
compared = 0
for prune_json in sorted(local.glob("pruned/*/*/*/prune.json")):
    other = slurm / prune_json.relative_to(local)
    x, y = json.loads(prune_json.read_text()), json.loads(other.read_text())
    for field in ("masks_sha256", "perms_sha256", "sparsity_file_sha256", "weights_sha256"):
        if x.get(field) != y.get(field):
            problems.append(f"{prune_json.relative_to(local)}: {field} {x.get(field)} != {y.get(field)}")
    compared += 1
for ppl_json in sorted(local.glob("ppl/*/*/*.json")):
    x, y = json.loads(ppl_json.read_text()), json.loads((slurm / ppl_json.relative_to(local)).read_text())
    if x.get("stream_sha256") != y.get("stream_sha256"):
        problems.append(f"{ppl_json.relative_to(local)}: evaluation token stream differs")
if problems:
    sys.exit("results differ between the local and the SLURM run:\n" + "\n".join(problems))
print(f"results identical: {len(a)} perplexities, masks/permutations/weights sha256 of {compared} pruned models")
print(b[["seqlen", "windows", "ppl"]].to_string())
PY
phase "checks"

echo
echo "SLURM accounting per job (elapsed, peak RSS of its steps, requested memory and time):"
python - "$work/sacct-steps.txt" <<'PY'
import sys
rows = [line.rstrip("\n").split("|") for line in open(sys.argv[1]) if line.strip()]
header, rows = rows[0], rows[1:]
col = {name: i for i, name in enumerate(header)}
def mb(text):
    units = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
    return float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text or 0) / 2**20
jobs = {}
for r in rows:
    job, _, step = r[col["JobIDRaw"]].partition(".")
    entry = jobs.setdefault(job, {"rss": 0.0})
    if not step:
        entry.update(state=r[col["State"]], comment=r[col["Comment"]], elapsed=r[col["Elapsed"]],
                     reqmem=r[col["ReqMem"]], limit=r[col["Timelimit"]], cpus=r[col["AllocCPUS"]])
    entry["rss"] = max(entry["rss"], mb(r[col["MaxRSS"]]))
print(f"{'job':>4}  {'state':<15}{'elapsed':>9}{'peak RSS MB':>12}{'ReqMem':>9}{'limit':>10}{'cpus':>5}  comment")
for job, e in sorted(jobs.items(), key=lambda kv: int(kv[0])):
    print(f"{job:>4}  {e.get('state', '?')[:15]:<15}{e.get('elapsed', ''):>9}{e['rss']:>12.0f}{e.get('reqmem', ''):>9}"
          f"{e.get('limit', ''):>10}{e.get('cpus', ''):>5}  {e.get('comment', '')}")
PY
echo
say "PASSED. Timings:"
printf '  %s\n' "${timings[@]}"
printf '  %-28s %5ds\n' total $(( $(date +%s) - t_start ))

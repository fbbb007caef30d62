# Shared pieces of scripts/ci-slurm (one node) and scripts/ci-multinode (three nodes in network
# namespaces): the installer, munged, the Slurm config, starting and stopping daemons, waiting
# for nodes and jobs. Sourced, not run. The sourcing script sets SC_NAME (its name, for
# messages) and SC_DIR (a temp dir for config, state, spool and logs), and may set SC_CTL (a
# command prefix that runs a Slurm client where slurmctld is reachable, e.g. `ip netns exec NS`).
# Every daemon it starts is recorded and stopped by sc_teardown (call it from an EXIT trap).
# shellcheck shell=bash

SC_CTL=("${SC_CTL[@]}")
sc_started_munge=0
# Pid files of the daemons this script started, stopped in reverse order.
sc_pid_files=()
# Jobs this script submitted (cancelled at teardown if still there).
sc_jobs=()
# What sc_wait_job found: job state(s), exit code(s), log file, `scontrol show job -o`.
# shellcheck disable=SC2034  # read by the sourcing script
SC_STATE="" SC_EXIT="" SC_LOG="" SC_INFO="" SC_JOB=""

sc_log() { echo "$SC_NAME: $*"; }
sc_die() {
    echo "$SC_NAME: FAILED: $*" >&2
    exit 1
}

# Root, no other Slurm here (its ports and jobs are not ours), packages (and any Debian packages
# named as arguments) and the tokenizer.
# shellcheck disable=SC2120  # the extra packages are optional
sc_prepare() {
    [ "$(id -u)" -eq 0 ] || sc_die "must run as root: it starts munged, slurmctld and slurmd"
    if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
        sc_die "a Slurm daemon is already running here: $(pgrep -ax '^slurm(ctld|d)$' | tr '\n' ' ')"
    fi
    scripts/install-deps slurm-wlm slurmctld slurmd slurm-client munge libpmix-dev openmpi-bin \
        python3 python3-pip "$@"
    # random:tiny uses the real Llama 3 tokenizer (fetched once into herd's cache).
    [ -n "${HERD_TOKENIZER:-}" ] || scripts/fetch-tokenizer
    # For the mpirun alternative in the scripts (srun does not need them).
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
}

# munged runs as user munge; it wants its run dir and a key it owns. Reuses one that answers.
sc_start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        sc_log "using the munged already running"
        return
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        sc_log "creating /etc/munge/munge.key"
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged
    sc_started_munge=1
    munge -n | unmunge >/dev/null ||
        sc_die "munged started but does not answer (see /var/log/munge/munged.log)"
}

# slurm.conf for controller HOST at ADDR; NODES are NodeName lines' "name=addr" pairs, all with
# CPUS CPUs and 2 fake GPUs (device nodes that are /dev/null: slurmd wants character devices,
# herd runs with --device cpu), in one partition `ci`. EXTRA lines are appended.
sc_write_conf() {
    local host="$1" addr="$2" cpus="$3" extra="$4"
    shift 4
    local names=() pair
    mkdir -p "$SC_DIR/state" "$SC_DIR/spool" "$SC_DIR/work" "$SC_DIR/log"
    cat >"$SLURM_CONF" <<EOF
ClusterName=ci
SlurmctldHost=$host($addr)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$SC_DIR/state
SlurmdSpoolDir=$SC_DIR/spool/%n
SlurmctldPidFile=$SC_DIR/slurmctld.pid
SlurmdPidFile=$SC_DIR/slurmd-%n.pid
SlurmctldLogFile=$SC_DIR/log/slurmctld.log
SlurmdLogFile=$SC_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=pmix
MailProg=/bin/true
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
ReturnToService=2
$extra
EOF
    mknod "$SC_DIR/gpu0" c 1 3
    mknod "$SC_DIR/gpu1" c 1 3
    : >"$SC_DIR/gres.conf"
    for pair in "$@"; do
        names+=("${pair%%=*}")
        mkdir -p "$SC_DIR/spool/${pair%%=*}"
        echo "NodeName=${pair%%=*} NodeAddr=${pair#*=} CPUs=$cpus Gres=gpu:2 State=UNKNOWN" \
            >>"$SLURM_CONF"
        echo "NodeName=${pair%%=*} Name=gpu File=$SC_DIR/gpu[0-1]" >>"$SC_DIR/gres.conf"
    done
    local IFS=,
    echo "PartitionName=ci Nodes=${names[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2" \
        >>"$SLURM_CONF"
}

# Start a daemon (CMD...) that writes PID_FILE, and remember to stop it.
sc_start_daemon() {
    local pid_file="$1"
    shift
    sc_pid_files+=("$pid_file")
    "$@"
}

sc_stop_pid_file() {
    local pid_file="$1" pid
    [ -f "$pid_file" ] || return 0
    pid=$(cat "$pid_file")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    sc_log "pid $pid ($pid_file) ignored SIGTERM for 10 s: SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
}

# A Slurm client command where slurmctld is reachable.
sc_ctl() { "${SC_CTL[@]}" "$@"; }

# Wait until sinfo shows N nodes idle (30 s), checking that every started daemon still runs.
sc_wait_idle() {
    local want="$1" state="" f
    local deadline=$((SECONDS + 30))
    while [ $SECONDS -lt $deadline ]; do
        for f in "${sc_pid_files[@]}"; do
            [ -f "$f" ] && ! kill -0 "$(cat "$f")" 2>/dev/null &&
                sc_die "the daemon of $f exited at start (logs below)"
        done
        # sinfo retries for a long time when slurmctld is gone: bound it.
        state=$(timeout 5 "${SC_CTL[@]}" sinfo -h -N -o %T 2>/dev/null | sort | uniq -c | xargs || true)
        [ "$state" = "$want idle" ] && return 0
        sleep 0.5
    done
    sc_die "not $want nodes idle within 30 s (sinfo says '${state:-nothing}')"
}

# sbatch ARGS... (with --parsable added); the job id in SC_JOB, remembered for the teardown.
# (Not in a $(...): the teardown would not learn of the job.)
sc_submit() {
    SC_JOB=$("${SC_CTL[@]}" sbatch --parsable "$@") || sc_die "sbatch $* failed"
    SC_JOB="${SC_JOB%%;*}"
    sc_jobs+=("$SC_JOB")
}

# Wait (at most SECS) for job JOB to leave the running states; sets SC_STATE, SC_EXIT, SC_LOG.
# An array job is done when none of its tasks runs.
sc_wait_job() {
    local job="$1" secs="$2" info states
    local deadline=$((SECONDS + secs))
    while :; do
        info=$(timeout 10 "${SC_CTL[@]}" scontrol show job "$job" -o) ||
            sc_die "scontrol show job $job failed"
        states=$(grep -o 'JobState=[A-Z_]*' <<<"$info" | cut -d= -f2 | sort -u | xargs)
        case " $states " in
            *" PENDING "* | *" CONFIGURING "* | *" RUNNING "* | *" COMPLETING "* | *" REQUEUED "* | \
                *" RESIZING "* | *" SUSPENDED "*)
                [ $SECONDS -lt "$deadline" ] || break
                sleep 0.5
                ;;
            *) break ;;
        esac
    done
    # shellcheck disable=SC2034  # read by the sourcing script
    SC_STATE="$states"
    # shellcheck disable=SC2034
    SC_EXIT=$(grep -o 'ExitCode=[0-9:]*' <<<"$info" | cut -d= -f2 | sort -u | xargs)
    # shellcheck disable=SC2034
    SC_LOG=$(grep -o 'StdOut=[^ ]*' <<<"$info" | cut -d= -f2 | head -n 1)
    # shellcheck disable=SC2034
    SC_INFO="$info"
}

sc_print_logs() {
    local f
    for f in "$SC_DIR"/log/*.log; do
        [ -f "$f" ] || continue
        echo "$SC_NAME: ---- last lines of $f"
        tail -n 40 "$f"
    done
}

# Stop what this script started: its jobs, the daemons (scontrol shutdown, then their pid
# files), munged if it started it; remove the temp dir. Safe to call more than once.
sc_teardown() {
    local job f i
    for job in "${sc_jobs[@]}"; do
        timeout 10 "${SC_CTL[@]}" scancel "$job" 2>/dev/null
    done
    if [ "${#sc_pid_files[@]}" -gt 0 ]; then
        timeout 10 "${SC_CTL[@]}" scontrol shutdown >/dev/null 2>&1
        # scontrol shutdown only asks: give the daemons a moment, then make sure.
        for _ in $(seq 50); do
            for f in "${sc_pid_files[@]}"; do
                [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && break
                f=""
            done
            [ -z "$f" ] && break
            sleep 0.2
        done
        for ((i = ${#sc_pid_files[@]} - 1; i >= 0; i--)); do
            sc_stop_pid_file "${sc_pid_files[i]}"
        done
    fi
    sc_pid_files=()
    sc_jobs=()
    if [ "$sc_started_munge" = 1 ]; then
        sc_stop_pid_file /run/munge/munged.pid
        sc_started_munge=0
    fi
    # pmix leaves its app dirs named after the job; ours are gone with the jobs.
    rm -rf /tmp/spmix_appdir_* "$SC_DIR"
}

#!/usr/bin/env bash
# The CIFAR-100 sweep on a lent GPU machine (the `device` tool), in calls made back to back (the tree that travels
# is limited to 64 MiB, so the sheets come in parts); the plan and the preparation here are in wip/README.md. Runs
# from the repository root on the device machine. Each call keeps what it carried in /tmp (kept while warm):
#   SRC=.dev/a bash wip/device-sweep.sh stash                                  # call 1: sheets
#   SRC=.dev/b RUNS=.dev/b/runs bash wip/device-sweep.sh stash                 # call 2: sheets, partial run states
#   SRC=.dev/c BUDGET=420 bash wip/device-sweep.sh run [--only POINT ...]      # call 3: the rest, sweep, pack
# What comes back ($OUT): back.tgz.aa, back.tgz.ab ... (a split tar: new checkpoints, the results store, every
# point's train.log and the run states of points left partial), and sweep.json (the sweep's summary).
set -euo pipefail
DS=/tmp/ds
stash() {
    mkdir -p "$DS/cifar100"
    src=${SRC:-.dev/c100}
    if [ -d "$src" ]; then find "$src" -maxdepth 1 -type f -exec cp {} "$DS/cifar100/" \; ; fi
    if [ -f "$DS/cifar100/materialize.py" ]; then mv -f "$DS/cifar100/materialize.py" "$DS/"; fi
    if [ -n "${RUNS:-}" ] && [ -d "$RUNS" ]; then mkdir -p "$DS/runs" && cp -r "$RUNS"/* "$DS/runs/"; fi
    ls -la "$DS" "$DS/cifar100"
}
case "${1:-}" in
stash)
    stash
    ;;
run)
    shift
    stash
    python3 "$DS/materialize.py" /tmp/data --only cifar100
    if [ -d "$DS/runs" ]; then  # partial points carried from this machine's runs/ (wip/ states)
        mkdir -p runs/sweeps/paper-cifar100
        cp -rn "$DS/runs"/* runs/sweeps/paper-cifar100/
    fi
    export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.used --format=csv,noheader || true
    # SIGINT at the budget: the sweep stops its workers; every finished epoch is on disk
    timeout -s INT "${BUDGET:-420}" python3 -c 'import sys; from hybridexit.cli import main; sys.exit(main())' \
        sweep sweeps/paper-cifar100.toml --data-dir /tmp/data --device "${DEVICE:-cuda}" --workers "${WORKERS:-4}" --threads 2 \
        --json "$@" > "$OUT/sweep.json" || echo "sweep ended with $? (124/130: the time budget)"
    tail -c 2000 "$OUT/sweep.json" || true
    # run states of the points without a kept checkpoint (not finished): to carry on elsewhere
    partial=$(for d in runs/sweeps/paper-cifar100/*/; do n=$(basename "$d")
        if [ -d "$d/checkpoint" ] && [ ! -d "checkpoints/c100-r32-$n" ]; then echo "$d/checkpoint"; fi; done)
    shopt -s nullglob
    back=(results/sweep-cifar100.json checkpoints/c100-r32-* runs/sweeps/paper-cifar100/*/train.log $partial)
    tar czf - --exclude checkpoints/c100-r32-fp32 "${back[@]}" | split -b 15M - "$OUT/back.tgz."
    ls -la "$OUT"
    ;;
*)
    echo "usage: bash wip/device-sweep.sh stash|run [sweep options]" >&2
    exit 2
    ;;
esac

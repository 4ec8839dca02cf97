#!/usr/bin/env bash
# Stand-in for a container launcher such as ~/text2video/run.sh (apptainer exec ...): runs its arguments with
# a PATH from which every Slurm client (scontrol, sbatch, squeue, scancel, srun, ...) has been removed, as
# inside the real container. A job that tried to requeue itself from in here would fail, so the tests prove
# that requeueing happens on the host side. Like apptainer, it execs the command, which keeps its exit code
# and receives signals directly.
set -euo pipefail
box=${SLURM_BOX:-${TMPDIR:-/tmp}/t2v-container-$(id -u)}
bin=$box/container-bin-$(printf %s "$PATH" | cksum | cut -d' ' -f1)  # one per host PATH
if [ ! -d "$bin" ]; then
  mkdir -p "$box"
  tmp=$(mktemp -d "$box/.container-bin.XXXXXX")
  IFS=: read -r -a dirs <<< "$PATH"
  for d in "${dirs[@]}"; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do
      name=${f##*/}
      case "$name" in
        sbatch|srun|scontrol|squeue|scancel|sacct|sacctmgr|salloc|sattach|sinfo|sstat|sprio|sshare|sdiag|sreport|strigger|sbcast|scrontab|sview|smap|sh5util) continue ;;
      esac
      [ -x "$f" ] && [ ! -e "$tmp/$name" ] && ln -s "$f" "$tmp/$name"
    done
  done
  mv -T "$tmp" "$bin" 2>/dev/null || rm -rf "$tmp"  # another task may have won the race
fi
export PATH=$bin
export T2V_IN_CONTAINER=1
if command -v scontrol >/dev/null 2>&1; then
  echo "container.sh: scontrol is still visible; refusing to run" >&2
  exit 97
fi
exec "$@"

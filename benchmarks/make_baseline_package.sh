#!/usr/bin/env bash
# A commit's (or branch's) omni_ep, importable beside today's package as NAME (default omni_ep_base), for A/Bs
# and output comparisons (bench_moe.py --mode ab; run_gpu_pipeline.sh check, agreement, ab, profile). Default
# commit: 4f8aa63, the experts before the kernel pruning. Writes .ab_base/NAME and .ab_base/NAME.COMMIT
# (git-ignored; other packages there stay: run_gpu_pipeline.sh ab runs every one); needs git and the commit.
#   bash benchmarks/make_baseline_package.sh [COMMIT [NAME]]     then carry .ab_base to the device
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:-4f8aa63}
name=${2:-omni_ep_base}
[[ $name =~ ^omni_ep_[A-Za-z0-9_]+$ ]] || { echo "NAME must look like omni_ep_<letters, digits, _>: $name" >&2; exit 2; }
mkdir -p .ab_base && rm -rf ".ab_base/$name" ".ab_base/$name.COMMIT"
tmp=$(mktemp -d)
git archive "$commit" omni_ep | tar -x -C "$tmp"
mv "$tmp/omni_ep" ".ab_base/$name" && rmdir "$tmp"
# Every absolute import of the package names the copy instead.
find ".ab_base/$name" -name '*.py' -exec sed -i -E "s/\bomni_ep\./$name./g; s/^(from|import) omni_ep( |\$)/\1 $name\2/" {} +
echo "$commit" > ".ab_base/$name.COMMIT"
echo "wrote .ab_base/$name from $commit"

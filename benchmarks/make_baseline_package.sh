#!/usr/bin/env bash
# A commit's (or branch's) omni_ep, importable beside today's package as omni_ep_base, for A/Bs and output
# comparisons (bench_moe.py --mode ab; run_gpu_pipeline.sh check, ab, profile). Default: 4f8aa63, the experts before
# the kernel pruning. Writes .ab_base/omni_ep_base (git-ignored); needs git and the commit.
#   bash benchmarks/make_baseline_package.sh [COMMIT]     then carry .ab_base to the device
set -euo pipefail
cd "$(dirname "$0")/.."
commit=${1:-4f8aa63}
rm -rf .ab_base && mkdir -p .ab_base
git archive "$commit" omni_ep | tar -x -C .ab_base
mv .ab_base/omni_ep .ab_base/omni_ep_base
# Every absolute import of the package names the copy instead.
find .ab_base/omni_ep_base -name '*.py' -exec sed -i -E 's/\bomni_ep\./omni_ep_base./g; s/^(from|import) omni_ep( |$)/\1 omni_ep_base\2/' {} +
echo "$commit" > .ab_base/COMMIT
echo "wrote .ab_base/omni_ep_base from $commit"

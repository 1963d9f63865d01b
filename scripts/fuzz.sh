#!/usr/bin/env bash
# Run every cargo-fuzz target for a fixed time (default 120 s each), one after the other.
#   scripts/fuzz.sh [seconds per target] [target ...]
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 unlocks them on the stable toolchain.
# A crash leaves its input under fuzz/artifacts/<target>/; turn it into a regression test (see
# src/state_codec.rs and README "Robustness") and re-run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-120}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(state_from_bytes sampler_steps sign_scan coordinated_from_bytes outer_steps norm_sums)
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
# Valid encoded states as seeds, so the fuzzer starts past the framing checks.
(cd .. && TORCHGRAB_FUZZ_SEEDS="$PWD/fuzz/corpus/state_from_bytes" cargo test --quiet --lib state_codec::tests::write_fuzz_seeds -- --ignored >/dev/null)
(cd .. && TORCHGRAB_FUZZ_SEEDS="$PWD/fuzz/corpus/coordinated_from_bytes" cargo test --quiet --lib checkpoint::tests::write_fuzz_seeds -- --ignored >/dev/null)
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${secs}s"
  cargo fuzz run -O "$t" "corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 2>&1 |
    grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|SUMMARY|thread '|panicked)" || true
  if ls "artifacts/$t"/crash-* >/dev/null 2>&1; then
    echo "!! $t: crash inputs in fuzz/artifacts/$t" && exit 1
  fi
done

#!/usr/bin/env bash
# Golden-image regression run for CI with `vaetool roundtrip`.
#
#   examples/ci_golden.sh            # compare with the goldens; exit 1 on any regression
#   UPDATE=1 examples/ci_golden.sh   # (re)write the goldens after an intended change, then commit them
#
# Every image under IMAGES is encoded and decoded; the decoded 8-bit PNGs are compared with the
# goldens under GOLDEN (PSNR >= 40 dB, SSIM >= 0.98, max diff <= 8 levels unless MIN_PSNR /
# MIN_SSIM / MAX_DIFF say otherwise). OUT receives the decoded images, report.json, junit.xml
# (for the CI's test view) and heatmaps/ with a diff heatmap of each failing image: keep OUT as
# the job's artifacts. Environment: MODEL (shipped config; default: the shipped mini model),
# CHECKPOINT, IMAGES (default examples/images), GOLDEN (default examples/golden), OUT (default ci-out).
set -euo pipefail
cd "$(dirname "$0")/.."

images=${IMAGES:-examples/images}
golden=${GOLDEN:-examples/golden}
out=${OUT:-ci-out}
args=(roundtrip "$images" --recursive --output "$out" --golden "$golden" --model "${MODEL:-mini}" --device cpu --dtype fp32)
[[ -n ${CHECKPOINT:-} ]] && args+=(--checkpoint "$CHECKPOINT")

if [[ ${UPDATE:-0} == 1 ]]; then
  exec vaetool "${args[@]}" --update-golden
fi
[[ -n ${MIN_PSNR:-} ]] && args+=(--min-psnr "$MIN_PSNR")
[[ -n ${MIN_SSIM:-} ]] && args+=(--min-ssim "$MIN_SSIM")
[[ -n ${MAX_DIFF:-} ]] && args+=(--max-diff "$MAX_DIFF")
exec vaetool "${args[@]}" --report "$out/report.json" --junit "$out/junit.xml"

#!/usr/bin/env bash
# Golden-image regression run for CI with `vaetool roundtrip`.
#
#   examples/ci_golden.sh            # compare with the goldens; exit 1 on any regression
#   UPDATE=1 examples/ci_golden.sh   # after an intended change: rewrite the goldens that no longer pass, then commit them
#
# Every image under IMAGES is encoded and decoded; the decoded 8-bit PNGs are compared with the
# goldens under GOLDEN (PSNR >= 40 dB, SSIM >= 0.98, max diff <= 8 levels unless MIN_PSNR /
# MIN_SSIM / MAX_DIFF say otherwise). OUT receives the decoded images, report.json, junit.xml
# (for the CI's test view), report.html (one self-contained page: per image the input, output,
# golden and heatmap, the broken limits highlighted; open it from the job's artifacts) and
# heatmaps/ with a diff heatmap of each failing image: keep OUT as the job's artifacts. UPDATE=1
# keeps the goldens that still pass byte for byte, so the git diff shows only real changes
# (FORCE=1 rewrites all). Environment: MODEL (shipped config; default: the shipped mini model),
# CHECKPOINT, IMAGES (default examples/images), GOLDEN (default examples/golden), OUT (default ci-out).
set -euo pipefail
cd "$(dirname "$0")/.."

images=${IMAGES:-examples/images}
golden=${GOLDEN:-examples/golden}
out=${OUT:-ci-out}
args=(roundtrip "$images" --recursive --output "$out" --golden "$golden" --model "${MODEL:-mini}" --device cpu --dtype fp32
      --html "$out/report.html")
[[ -n ${CHECKPOINT:-} ]] && args+=(--checkpoint "$CHECKPOINT")

[[ -n ${MIN_PSNR:-} ]] && args+=(--min-psnr "$MIN_PSNR")  # the limits also decide which goldens UPDATE=1 rewrites
[[ -n ${MIN_SSIM:-} ]] && args+=(--min-ssim "$MIN_SSIM")
[[ -n ${MAX_DIFF:-} ]] && args+=(--max-diff "$MAX_DIFF")

if [[ ${UPDATE:-0} == 1 ]]; then
  [[ ${FORCE:-0} == 1 ]] && args+=(--force)
  exec vaetool "${args[@]}" --update-golden
fi
exec vaetool "${args[@]}" --report "$out/report.json" --junit "$out/junit.xml"

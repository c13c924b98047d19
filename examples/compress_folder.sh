#!/usr/bin/env bash
# Compress a folder of images to latent files with `vaetool encode`.
#
#   examples/compress_folder.sh IMAGES_DIR LATENTS_DIR
#   MODEL=sdxl CHECKPOINT=sdxl_vae.safetensors examples/compress_folder.sh photos/ latents/
#
# Resumable: every latent is written atomically and existing ones are skipped, so after a crash,
# a kill or a reboot the same command finishes only what is missing. Unreadable images are listed
# and skipped; the script then exits 1 (rerun after fixing them, or ignore them).
# Environment: MODEL (shipped config name; default: vaetool's default model), CHECKPOINT (weights),
# SHARD_SIZE (N latents per file plus index.json, for very large sets), EXTRA (more encode options).
set -euo pipefail

src=${1:?usage: compress_folder.sh IMAGES_DIR LATENTS_DIR}
dst=${2:?usage: compress_folder.sh IMAGES_DIR LATENTS_DIR}

args=(encode "$src" --recursive --output "$dst")
[[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
[[ -n ${CHECKPOINT:-} ]] && args+=(--checkpoint "$CHECKPOINT")
[[ -n ${SHARD_SIZE:-} ]] && args+=(--shard-size "$SHARD_SIZE")
# shellcheck disable=SC2206 # EXTRA is split on purpose
[[ -n ${EXTRA:-} ]] && args+=($EXTRA)

status=0
vaetool "${args[@]}" || status=$?
# the JSONL manifest records every file: written, skipped (already there) or failed with its reason
if [[ -f $dst/manifest.jsonl ]]; then
  echo "manifest: $dst/manifest.jsonl ($(wc -l < "$dst/manifest.jsonl") records)"
fi
exit "$status"

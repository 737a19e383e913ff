#!/usr/bin/env bash
# Regenerate the example speech files and manifest.jsonl (NeMo style) in this folder.
# Needs espeak-ng, ffmpeg and python3. Output is deterministic for a given espeak-ng version (1.51 here).
set -euo pipefail
cd "$(dirname "$0")"

VOICE=en-us
RATE=150  # words per minute, as tests/speech.py

# name|extension|text  (flac: lossless; ogg: opus at 32 kbit/s, about 10x smaller)
EXAMPLES=(
  "fox|flac|The quick brown fox jumps over the lazy dog."
  "weather|flac|The weather is nice today, so we will walk to the park."
  "coffee|ogg|Please bring me a cup of hot coffee and two slices of bread."
  "anna|ogg|My name is Anna and I live in a small town near the sea. Every morning I wake up early and drink a glass of water. Then I walk my dog along the beach for half an hour. The air is fresh and the sky is often clear and blue. After breakfast I ride my bicycle to the library where I work. I help people find books about history, science and travel. In the afternoon the children come in after school to read stories. At six o'clock I close the doors and go back home. In the evening I cook dinner and call my sister on the phone. Before bed I read a few pages of a good book. It is a quiet and happy life."
)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/manifest.jsonl"
for row in "${EXAMPLES[@]}"; do
  IFS='|' read -r name ext text <<< "$row"
  espeak-ng -v "$VOICE" -s "$RATE" -w "$tmp/$name.wav" "$text"
  codec=()
  [ "$ext" = ogg ] && codec=(-c:a libopus -b:a 32k)
  ffmpeg -nostdin -loglevel error -y -i "$tmp/$name.wav" -ac 1 -ar 16000 "${codec[@]}" "$name.$ext"
  # duration as the decoder sees it: 16 kHz mono s16 samples, like whisper.load_audio
  bytes=$(ffmpeg -nostdin -loglevel error -i "$name.$ext" -f s16le -ac 1 -ar 16000 - | wc -c)
  python3 -c 'import json, sys; print(json.dumps({"id": sys.argv[1], "audio_filepath": sys.argv[2], "duration": round(int(sys.argv[3]) / 32000, 3), "text": sys.argv[4]}))' \
    "$name" "$name.$ext" "$bytes" "$text" >> "$tmp/manifest.jsonl"
done
mv "$tmp/manifest.jsonl" manifest.jsonl
ls -l manifest.jsonl ./*.flac ./*.ogg

# Sourced by the training benchmarks: sets `text` (the flags that name the corpus, none for the examples' default)
# and `corpus` (its name for the JSON). The King James Bible when its Debian package is installed, else
# tests/data/kjv_genesis.txt; SUBSPACE_CORPUS names a text file of one's own instead.
text=()
corpus="King James Bible (Debian bible-kjv-text)"
if [ -n "${SUBSPACE_CORPUS:-}" ]; then
  text=(--text "$SUBSPACE_CORPUS")
  corpus="$(basename "$SUBSPACE_CORPUS")"
elif [ ! -e /usr/lib/bible.data ]; then
  text=(--text "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/tests/data/kjv_genesis.txt")
  corpus="tests/data/kjv_genesis.txt (Genesis, KJV)"
fi

#!/usr/bin/env bash
# Instructions per message of the per-message path (benches/per_message.rs), counted by
# valgrind's callgrind: exact, unlike the wall clock on a shared VM.
#
# It runs the driver at two message counts and divides the difference in instructions by the
# difference in messages, so start-up (journal open, handshake, declare, consume, warm-up)
# cancels. Only `broker_turn` is collected (--toggle-collect): the bench's client, which encodes
# publishes and acks and decodes deliveries, is not counted. Then the top functions of the
# per-message part, by self and by inclusive cost (each function's cost, too, is the difference
# of the two runs over the difference in messages). The driver's own report line gives the heap
# allocations per message (a counting allocator).
#
# Reading the counts: valgrind counts a `rep stos`/`rep movs` once per byte it moves, so glibc's
# memset/memcpy above ~2 KiB (where it switches to `rep stosb`/`movsb`) weigh more here than
# they cost a CPU.
#
# Usage: benches/callgrind.sh [SHORT LONG]     (default 2000 12000)
# Needs valgrind (callgrind_annotate comes with it). Builds with the bench profile (optimised,
# debug info). Output and the callgrind files go to target/callgrind/.
set -euo pipefail

short=${1:-2000}
long=${2:-12000}
top=${TOP:-25}
root=$(cd "$(dirname "$0")/.." && pwd)
out="$root/target/callgrind"
mkdir -p "$out"
cd "$root"

command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }
command -v python3 >/dev/null || { echo "callgrind.sh: needs python3" >&2; exit 1; }

bin=$(cargo bench -p weir --bench per_message --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*per_message[^"]*\)".*/\1/p' | tail -n 1)
[ -x "$bin" ] || { echo "callgrind.sh: no per_message bench binary found" >&2; exit 1; }

# Counts the instructions collected in a run of $1 messages; the run's own report line (with
# heap allocations per message) goes to $out/run-$1.txt.
count() {
    local n=$1
    valgrind --tool=callgrind --toggle-collect='*broker_turn*' \
        --callgrind-out-file="$out/callgrind.out.$n" "$bin" "$n" \
        >"$out/run-$n.txt" 2>"$out/valgrind-$n.txt"
    sed -n 's/^==[0-9]*== Collected : \([0-9]*\).*/\1/p' "$out/valgrind-$n.txt"
}

ir_short=$(count "$short")
ir_long=$(count "$long")
per=$(( (ir_long - ir_short) / (long - short) ))

echo "per-message path, 1 KiB persistent message, one shard, fsync = always:"
echo "  publish + confirm + deliver + ack, each its own frame, one message at a time"
echo "  instructions: $ir_short at $short messages, $ir_long at $long"
echo "  => $per instructions per message (broker only)"
echo "  run report: $(cat "$out/run-$long.txt")"
echo

# The per-message part of the profile: each function's cost in the longer run less its cost in
# the shorter, over the difference in messages (start-up cancels here too).
profile() {
    local inclusive=$1
    for n in "$short" "$long"; do
        callgrind_annotate --auto=no --inclusive="$inclusive" --threshold=100 "$out/callgrind.out.$n" \
            2>/dev/null >"$out/annotate-$inclusive-$n.txt"
    done
    python3 - "$out/annotate-$inclusive-$short.txt" "$out/annotate-$inclusive-$long.txt" \
        "$((long - short))" "$per" "$top" "$inclusive" <<'PY'
import re, sys
inclusive = sys.argv[6] == "yes"
def costs(path):
    # "1,234 (5.6%)  file:function [object]": callgrind splits a function by the source file of
    # its inlined code; self costs add up, inclusive ones overlap (the largest is kept).
    c = {}
    for line in open(path):
        m = re.match(r"^\s*([0-9,]+) \([ 0-9.]+%\)\s+(\S*?\.(?:rs|c|S|h)|\?\?\?):(.*?)(?: \[[^\]]*\])?$", line)
        if m:
            v, k = int(m.group(1).replace(",", "")), m.group(3)
            c[k] = max(c.get(k, 0), v) if inclusive else c.get(k, 0) + v
    return c
a, b = costs(sys.argv[1]), costs(sys.argv[2])
dn, per, top = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rows = sorted(((b.get(k, 0) - a.get(k, 0)) / dn, k) for k in set(a) | set(b))
rows.reverse()
# Inclusive: the frames that hold the whole run (main, the driver) say nothing.
rows = [(v, k) for v, k in rows if not inclusive or v < 0.99 * per]
print(f"{'instr/msg':>10} {'share':>6}  function")
for v, k in rows[:top]:
    print(f"{v:10.0f} {100 * v / per:5.1f}%  {k[:150]}")
PY
}

echo "== top $top functions by self cost, per message =="
profile no
echo
echo "== top $top functions by inclusive cost, per message =="
profile yes
echo
echo "callgrind files: $out/callgrind.out.{$short,$long} (callgrind_annotate, kcachegrind)"

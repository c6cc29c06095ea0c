#!/usr/bin/env bash
# Collect the wheels benchmarks/gpu_check.sh installs on the GPU machine (no network there),
# on a machine that reaches PyPI:
#
#   benchmarks/wheelhouse.sh [DEST]        # DEST defaults to .whl (in .git/info/exclude: /.whl/)
#
# The list is benchmarks/gpu_wheels.txt, its versions resolved by benchmarks/gpu_wheels.py
# (megatron-core: the pin requirements/cpu.txt has for Python 3.12). Each is downloaded as a
# wheel for CPython 3.12 on x86-64 Linux; a release PyPI has only as an sdist
# (antlr4-python3-runtime 4.9.3) is built into a wheel here with `pip wheel --no-deps`,
# which is right for pure-Python packages only: the check at the end refuses any other.
# Ends with the check gpu_check.sh makes (names, versions, one wheel each) and the sizes.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${1:-.whl}
python=${PYTHON:-python3}
mkdir -p "$dest" || exit 1

py_version=$("$python" "$here/gpu_wheels.py" --python-version) || exit 2
mapfile -t wanted < <("$python" "$here/gpu_wheels.py" --list)
[[ ${#wanted[@]} -gt 0 ]] || { echo "error: benchmarks/gpu_wheels.txt lists nothing" >&2; exit 2; }

download=(-m pip download -q --no-deps --only-binary=:all:
          --python-version "$py_version" --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 -d "$dest")
failed=()
for req in "${wanted[@]}"; do
    echo "$req"
    if ! "$python" "${download[@]}" "$req" 2>/dev/null; then
        echo "  no $py_version x86-64 wheel on the index: building it from the sdist"
        "$python" -m pip wheel -q --no-deps -w "$dest" "$req" || failed+=("$req")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    printf 'error: could not get a wheel of %s\n' "${failed[@]}" >&2
    exit 1
fi

echo
"$python" "$here/gpu_wheels.py" --check "$dest" | while read -r wheel; do
    du -k "$wheel"
done
status=${PIPESTATUS[0]}
du -sh "$dest"
exit "$status"

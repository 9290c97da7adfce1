#!/usr/bin/env bash
# Installs the ms-swift training environment into its own virtualenv (default .swift-venv),
# kept apart from the API's environment so their dependency pins never fight.
# The API finds it through SWIFT_BIN (default: .swift-venv/bin/swift when it exists, else `swift` on PATH).
#   SWIFT_VENV=/opt/swift ./install_all.sh          # another place
#   MS_SWIFT_VERSION=3.5.3 ./install_all.sh         # the 3.x line
#   TORCH_SPEC="torch==2.13.0" ./install_all.sh     # the torch to install first (CPU build on our CI machines)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${SWIFT_VENV:-$here/.swift-venv}"
swift_version="${MS_SWIFT_VERSION:-4.6.0}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/swift" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('ms-swift') != '$swift_version')" 2>/dev/null; then
  echo "ms-swift $swift_version already installed in $venv"
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first: a plain `torch` requirement pulled in by ms-swift would fetch a multi-GB CUDA build.
"$venv/bin/python" -m pip install -q "$torch_spec"
torch_installed="$("$venv/bin/python" -c "import importlib.metadata as m; print(m.version('torch'))")"
constraints="$(mktemp)"
echo "torch==$torch_installed" >"$constraints"
if [ "${swift_version%%.*}" = "3" ]; then
  # ms-swift 3.x backtracks for minutes without these (and dies at import without pyarrow<20).
  cat >>"$constraints" <<'C'
transformers==4.52.4
huggingface-hub<1.0
peft==0.15.2
trl==0.19.1
datasets==3.3.2
accelerate<1.11
numpy<2.0
gradio<6
modelscope<1.30
pyarrow<20
C
fi
"$venv/bin/python" -m pip install -q "ms-swift==$swift_version" -c "$constraints"
rm -f "$constraints"
"$venv/bin/python" -c "import importlib.metadata as m; print('ms-swift', m.version('ms-swift'), 'torch', m.version('torch'))"
echo "swift CLI: $venv/bin/swift"

#!/usr/bin/env bash
# Installs the ms-swift training environment into its own virtualenv (default .swift-venv),
# kept apart from the API's environment so their dependency pins never fight.
# The API finds it through SWIFT_BIN (default: .swift-venv/bin/swift when it exists, else `swift` on PATH).
#   SWIFT_VENV=/opt/swift ./install_all.sh          # another place
#   MS_SWIFT_VERSION=3.5.3 ./install_all.sh         # the 3.x line
#   TORCH_SPEC="torch==2.13.0" ./install_all.sh     # the torch to install first
#   TORCH_INDEX_URL=... ./install_all.sh            # an extra index for it ("" for none). Default: PyTorch's CPU
#                                                   # index on a machine without nvidia-smi, when it answers
#                                                   # (PyPI's torch is the multi-GB CUDA build)
#   ./install_all.sh --tests                        # also what the test suite needs outside Python: Debian's
#                                                   # chromium (the dashboard's browser tests drive it), if missing
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

if [ "${1:-}" = "--tests" ] && ! command -v chromium >/dev/null 2>&1; then
  # Playwright's own browser download is unreachable from many networks: the tests drive Debian's chromium.
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo -n "$@"; fi; }
  if command -v apt-get >/dev/null 2>&1 && as_root apt-get update -q && \
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -q chromium fonts-liberation; then
    echo "chromium installed for the dashboard's browser tests"
  else
    echo "install_all.sh: the dashboard's browser tests need chromium on PATH: install it as root" \
      "(apt-get install chromium fonts-liberation), then run this again" >&2
    exit 1
  fi
elif [ -n "${1:-}" ] && [ "${1:-}" != "--tests" ]; then
  echo "usage: ./install_all.sh [--tests]" >&2
  exit 2
fi
venv="${SWIFT_VENV:-$here/.swift-venv}"
swift_version="${MS_SWIFT_VERSION:-4.6.0}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
python="${PYTHON:-python3}"

if [ -x "$venv/bin/swift" ] && "$venv/bin/python" -c "import importlib.metadata as m, sys; import msgspec; sys.exit(m.version('ms-swift') != '$swift_version')" 2>/dev/null; then
  echo "ms-swift $swift_version already installed in $venv"
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first: a plain `torch` requirement pulled in by ms-swift would fetch a multi-GB CUDA build. Without a GPU,
# the CPU build: its index as an extra one, so a configured index or mirror still serves everything else (and
# torch==X matches X+cpu, which ranks above X).
cpu_index="https://download.pytorch.org/whl/cpu"
if [ -z "${TORCH_INDEX_URL+set}" ]; then
  TORCH_INDEX_URL=""
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "torch from the configured index (an NVIDIA GPU is here: its CUDA build)"
  elif "$venv/bin/python" -c "import urllib.request as u; u.urlopen('$cpu_index/torch/', timeout=5)" 2>/dev/null; then
    TORCH_INDEX_URL="$cpu_index"
  else
    # Said, not silent: on a machine without a CPU wheel at hand, pip now fetches PyPI's multi-GB CUDA build.
    echo "torch from the configured index: PyTorch's CPU index ($cpu_index) did not answer, so this may be the" \
      "multi-GB CUDA build; set TORCH_INDEX_URL to another index of CPU wheels to avoid it"
  fi
fi
if [ -n "$TORCH_INDEX_URL" ]; then
  echo "torch from $TORCH_INDEX_URL (and the configured index)"
  "$venv/bin/python" -m pip install -q "$torch_spec" --extra-index-url "$TORCH_INDEX_URL"
else
  "$venv/bin/python" -m pip install -q "$torch_spec"
fi
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
# msgspec: ms-swift's GRPO and GKD trainers import it without declaring it (every such run died at import).
"$venv/bin/python" -m pip install -q "ms-swift==$swift_version" msgspec -c "$constraints"
rm -f "$constraints"
"$venv/bin/python" -c "import importlib.metadata as m; print('ms-swift', m.version('ms-swift'), 'torch', m.version('torch'))"
echo "swift CLI: $venv/bin/swift"

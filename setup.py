import os
import sys

from setuptools import find_packages, setup


def cuda_extensions():
    """The fused SeLoRA op, built ahead of time when a CUDA toolkit and a CUDA build of torch are present."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return [], {}
    if CUDA_HOME is None or torch.version.cuda is None or os.environ.get("MINISD_NO_BUILD"):
        return [], {}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels"))
    from build import cuda_extensions as extensions
    from torch.utils.cpp_extension import BuildExtension
    return extensions(), {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions() if os.path.exists(os.path.join("kernels", "build.py")) else ([], {})

setup(
    name="minisd",
    version="0.1.0",
    description="Compact Stable Diffusion 1.5 with SeLoRA fine-tuning for medical image-text data",
    packages=find_packages(include=["minisd", "minisd.*"]),
    python_requires=">=3.10",
    # pydicom reads DICOM films; it decodes JPEG 2000 and JPEG baseline through Pillow (>= 10) and RLE itself
    install_requires=["torch>=2.4", "numpy", "safetensors", "pillow>=10", "scipy", "ninja", "open-clip-torch", "ftfy",
                      "regex", "tqdm", "huggingface_hub", "tokenizers", "matplotlib", "pydicom>=3"],
    # test-only references: pydicom-data (real DICOM films), torchxrayvision (its DenseNet and the OpenI reports)
    extras_require={"test": ["pytest", "diffusers", "transformers", "peft", "pytorch-fid", "accelerate",
                             "pydicom-data", "torchxrayvision"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

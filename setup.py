"""goca_fast: GOCA two-stream video self-supervised pretraining, fast.

The CUDA Sinkhorn extension in kernels/ is built when torch has CUDA and nvcc is found; otherwise the package
installs without it (the torch path is always there).
"""
import glob
import os

from setuptools import find_packages, setup


def cuda_extensions():
    sources = sorted(glob.glob("kernels/*.cu")) + sorted(glob.glob("kernels/*.cpp"))
    if not sources or os.environ.get("GOCA_FAST_NO_CUDA_EXT"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return [], {}
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return [], {}
    if CUDA_HOME is None:
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    ext = CUDAExtension("goca_fast._sinkhorn_cuda", sources, extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="goca_fast",
    version="0.1.0",
    description="Fast, reliable GOCA (Guided Online Cluster Assignment) for two-stream video SSL",
    python_requires=">=3.10",
    packages=find_packages(include=["goca_fast", "goca_fast.*", "dali_pipelines", "dali_pipelines.*"]),
    data_files=[("share/goca_fast/configs", sorted(glob.glob("configs/*.yaml")))],
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy",
        "pyyaml",
        "av>=11",
        "opencv-contrib-python-headless",
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda110==1.34.0"],
        "dev": ["pytest", "POT"],
    },
    entry_points={
        "console_scripts": [
            "goca-pretrain=goca_fast.pretrain:main",
            "goca-eval=goca_fast.eval.cli:main",
            "goca-prepare=goca_fast.data.prepare:main",
            "goca-flow=goca_fast.flow.extract:main",
            "goca-prototypes=goca_fast.prototypes:main",
        ],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
